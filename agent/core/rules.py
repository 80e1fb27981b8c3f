"""The device's rules: events in, plans out (the h11 way).

Pure: no I/O, no clock, no randomness. Each rule takes the device's ``Settings``
(``agent.core.settings``), its ``CoreConfig`` and one event with its ``now`` and
any msg_id the shell minted, and returns a ``Plan``: the new settings and what
the shell must carry out. ``agent.device.Device`` carries a plan out on the store
in one transaction (purge, re-coarsen, capture, ledger, save), then tells the
transport which purposes must stop leaving at once (``Plan.stop``).

Every capture and every hand-off is decided by ``consent.decide`` (P1): here at
capture, and in ``may_send`` at hand-off. Cloud commands are decided in
``agent.core.cloud``, which calls these rules with the command's stamp.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core import consent, crashes, ledger, lifecycle
from agent.core.consent import Decision, Grant, Source
from agent.core.identity import safe_binding_id, validate_binding_id
from agent.core.items import DropReason, expired
from agent.core.lifecycle import Event, State
from agent.core.location import DECIMALS, CoarseLocation, Precision, coarsen, recoarsen
from agent.core.ordering import Clock, Stamp, rebased
from agent.core.purposes import DELETION_KIND, POLICIES, Purpose, build_envelope, rfc3339
from agent.core.settings import CoreConfig, CrashReport, Settings
from agent.errors import ConsentNotInForce, SchemaError

ALL = frozenset(Purpose)

__all__ = ["CoreConfig", "CrashReport", "Plan", "Settings"]


@dataclass(frozen=True, slots=True)
class Purge:
    """Delete the queued items of ``purpose``, for ``reason``: every one, or only those
    captured before the device time ``before`` (a narrowing heard late, SPEC §3)."""

    purpose: Purpose
    reason: DropReason
    before: float | None = None


@dataclass(frozen=True, slots=True)
class Recoarsen:
    """Re-coarsen the location of queued activations to ``precision`` (P3): every one,
    or only those captured before the device time ``before``."""

    precision: Precision
    before: float | None = None


@dataclass(frozen=True, slots=True)
class Capture:
    """A new item to queue: its payload is built, the shell seals and stores it."""

    msg_id: str
    purpose: Purpose
    captured_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class Wipe:
    """P9: destroy the data key and every personal record; ``journal`` makes it resumable.

    ``deletion_request`` (msg_id, created_at, payload) is the P10 request that the
    journal keeps, under the system key, until the cloud acknowledges it.
    """

    reason: str
    journal: bool
    deletion_request: tuple[str, float, bytes] | None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one event requires of the shell."""

    settings: Settings
    save: bool = True  # the settings changed: seal and write the record
    purge: tuple[Purge, ...] = ()
    # Queued activations whose location must be re-coarsened (P3).
    recoarsen: tuple[Recoarsen, ...] = ()
    capture: Capture | None = None
    ledger: tuple[dict[str, Any], ...] = ()
    wipe: Wipe | None = None
    # Purposes that must stop leaving before the event returns (P2, P3, P9, P13).
    stop: frozenset[Purpose] = field(default_factory=frozenset)

    @property
    def noop(self) -> bool:
        """Whether the event changed nothing at all."""
        return not (
            self.save
            or self.purge
            or self.capture
            or self.ledger
            or self.wipe
            or self.stop
            or self.recoarsen
        )

    @property
    def narrows(self) -> bool:
        """Whether the plan reduces what is collected or kept: it must take effect in
        memory even when its write fails, and its write is retried (fail closed)."""
        return bool(self.stop or self.purge or self.wipe is not None or self.recoarsen)

    def then(self, nxt: Plan) -> Plan:
        """This plan followed by ``nxt``, which was decided on this plan's settings."""
        if self.capture is not None and nxt.capture is not None:
            raise SchemaError("one event captures at most one item")
        return Plan(
            nxt.settings,
            save=self.save or nxt.save,
            purge=self.purge + nxt.purge,
            recoarsen=self.recoarsen + nxt.recoarsen,
            capture=self.capture or nxt.capture,
            ledger=self.ledger + nxt.ledger,
            wipe=nxt.wipe or self.wipe,
            stop=self.stop | nxt.stop,
        )


def unchanged(s: Settings) -> Plan:
    """A plan that carries out nothing."""
    return Plan(s, save=False)


def decide(s: Settings, purpose: Purpose) -> Decision:
    """The single gate: may an item of ``purpose`` be captured or sent now?"""
    return consent.decide(s.consent, purpose)


def local_stamp(s: Settings, now: float) -> Stamp:
    """When a local action at device time ``now`` was made, on the cloud's clock."""
    return Stamp.local(s.control.clock, now)


def _consent_entry(
    cfg: CoreConfig, action: str, purpose: Purpose | None, now: float, source: Source
) -> dict[str, Any]:
    return ledger.consent_entry(
        action,
        purpose.value if purpose else None,
        now=now,
        source=source,
        policy_version=cfg.policy_version,
    )


def superseded(s: Settings) -> tuple[Purge, ...]:
    """Items whose grant is no longer the one in force (P6: policy changed, P2 withdrawn)."""
    stale = (consent.Reason.STALE_POLICY, consent.Reason.NOT_GRANTED)
    return tuple(Purge(p, DropReason.SUPERSEDED) for p in Purpose if decide(s, p).reason in stale)


def purge_superseded(s: Settings) -> Plan:
    """Drop what no grant in force covers any more (on opening the store)."""
    return Plan(s, save=False, purge=superseded(s))


def clock_compared(s: Settings, clock: Clock) -> Plan:
    """The command sync measured the device clock against the cloud's (SPEC §3); local
    stamps taken before any comparison are put on the cloud's clock with it."""
    after = s.with_control(dataclasses.replace(s.control, clock=clock))
    if not any(st.error is None for st in after.stamps.values()):
        return Plan(after, save=False)
    stamps = {k: rebased(st, clock) for k, st in after.stamps.items()}
    return Plan(
        dataclasses.replace(after, stamps=stamps), save=s.lifecycle is not State.FACTORY_NEW
    )


# -- lifecycle ------------------------------------------------------------------
def activation(s: Settings, cfg: CoreConfig, *, now: float, msg_id: str) -> Plan:
    """Capture the due activation if its consent is in force (once per trigger, P4)."""
    if s.lifecycle is not State.ACTIVATION_DUE or s.activation_trigger is None:
        return unchanged(s)
    decision = decide(s, Purpose.ACTIVATION)
    if not decision.allowed or decision.grant is None:
        return unchanged(s)
    loc = recoarsen(s.location, s.precision)
    data = {
        "serial": cfg.serial,
        "model": cfg.model,
        "firmware_version": cfg.firmware_version,
        "trigger": s.activation_trigger,
        "location": None if loc is None else loc.to_json(),
    }
    capture = _capture(cfg, Purpose.ACTIVATION, data, decision.grant, now=now, msg_id=msg_id)
    after = dataclasses.replace(
        s,
        lifecycle=lifecycle.step(s.lifecycle, Event.ACTIVATE).state,
        activation_trigger=None,
    )
    return Plan(after, capture=capture)


def _then_activate(plan: Plan, cfg: CoreConfig, *, now: float, msg_id: str) -> Plan:
    """``plan``, followed by the activation it may have made possible."""
    act = activation(plan.settings, cfg, now=now, msg_id=msg_id)
    return plan if act.noop else plan.then(act)


def bind(
    s: Settings,
    cfg: CoreConfig,
    binding_id: str,
    *,
    minor: bool,
    restored: bool,
    now: float,
    msg_id: str,
) -> Plan:
    """Bind to an owner; an activation becomes due (first, or restore after a wipe)."""
    validate_binding_id(binding_id)
    step = lifecycle.step(s.lifecycle, Event.BIND)
    after = dataclasses.replace(
        s,
        consent=consent.bound(s.consent, minor=minor),
        lifecycle=step.state,
        activation_trigger="restore" if restored else "first-activation",
        binding_id=binding_id,
    )
    return _then_activate(Plan(after), cfg, now=now, msg_id=msg_id)


def firmware_updated(s: Settings, cfg: CoreConfig, *, now: float, msg_id: str) -> Plan:
    """``cfg`` names a new firmware: a fresh activation is due if the device is bound."""
    step = lifecycle.step(s.lifecycle, Event.FIRMWARE_UPDATE)
    if step.effect != "activation-due":
        return unchanged(s)
    after = dataclasses.replace(s, lifecycle=step.state, activation_trigger="firmware-update")
    return _then_activate(Plan(after), cfg, now=now, msg_id=msg_id)


def policy_changed(s: Settings, cfg: CoreConfig, *, now: float, msg_id: str) -> Plan:
    """``cfg`` names a new privacy policy: earlier grants stop counting (P6)."""
    after = dataclasses.replace(
        s, consent=consent.with_policy_version(s.consent, cfg.policy_version)
    )
    plan = Plan(after, purge=superseded(after), stop=ALL)
    return _then_activate(plan, cfg, now=now, msg_id=msg_id)


def deletion_request(
    device_id: str, msg_id: str, *, now: float, binding_id: str | None, reason: str
) -> bytes:
    """The deletion request's envelope (P10); ``binding_id`` None and ``reason``
    ``unknown`` make the stand-in for a request whose sealed copies are lost."""
    return build_envelope(
        kind=DELETION_KIND,
        msg_id=msg_id,
        device_id=device_id,
        captured_at=now,
        data={"binding_id": binding_id, "reason": reason, "requested_at": rfc3339(now)},
        receipt=None,
    )


def wipe(s: Settings, cfg: CoreConfig, event: Event, *, now: float, msg_id: str) -> Plan:
    """P9 wipe and P10 deletion request (unbind, factory reset, account cancellation).

    Everything personal goes, precision returns to its default (P3); the control
    record stays: a suspension lasts until resumed (P13).
    """
    step = lifecycle.step(s.lifecycle, event)
    reason = lifecycle.WIPE_REASONS[event]
    request = None
    if step.effect == "wipe" and s.binding_id is not None:
        payload = deletion_request(
            cfg.device_id, msg_id, now=now, binding_id=safe_binding_id(s.binding_id), reason=reason
        )
        request = (msg_id, now, payload)
    after = Settings.fresh(s.consent.policy_version, s.control)
    return Plan(after, save=False, wipe=Wipe(reason, step.effect == "wipe", request), stop=ALL)


# -- consent ----------------------------------------------------------------------
def grant(
    s: Settings,
    cfg: CoreConfig,
    purpose: Purpose,
    *,
    now: float,
    source: Source,
    msg_id: str,
    stamp: Stamp | None = None,
) -> Plan:
    """Grant consent for a purpose; a repeated grant is a new grant (SPEC §3)."""
    if s.lifecycle is State.FACTORY_NEW:
        raise ConsentNotInForce(purpose.value, "the device is not bound to an owner")
    before = s.consent.grants.get(purpose)
    after = dataclasses.replace(
        s, consent=consent.grant(s.consent, purpose, now=now, source=source)
    )
    # Items captured under a grant of another policy version are not covered (P6).
    stale = before is not None and before.policy_version != s.consent.policy_version
    plan = Plan(
        after.stamped(f"consent:{purpose.value}", stamp or local_stamp(s, now)),
        purge=(Purge(purpose, DropReason.SUPERSEDED),) if stale else (),
        ledger=(_consent_entry(cfg, "grant", purpose, now, source),),
    )
    return _then_activate(plan, cfg, now=now, msg_id=msg_id)


def withdraw(
    s: Settings,
    cfg: CoreConfig,
    purpose: Purpose,
    *,
    now: float,
    source: Source,
    stamp: Stamp | None = None,
) -> Plan:
    """Withdraw consent (P2): the gate closes, every pending item of it goes, and
    whatever of it the transport holds stops leaving."""
    if s.lifecycle is State.FACTORY_NEW:
        return unchanged(s)
    after = dataclasses.replace(s, consent=consent.withdraw(s.consent, purpose))
    return Plan(
        after.stamped(f"consent:{purpose.value}", stamp or local_stamp(s, now)),
        purge=(Purge(purpose, DropReason.WITHDRAWN),),
        ledger=(_consent_entry(cfg, "withdraw", purpose, now, source),),
        stop=frozenset({purpose}),
    )


def suspension(
    s: Settings,
    cfg: CoreConfig,
    value: bool,
    *,
    now: float,
    source: Source,
    msg_id: str,
    stamp: Stamp,
) -> Plan:
    """Suspend (P13) or resume all personal-data collection, bound or not.

    The suspension lives in the control record, so it outlasts wipes and rebinds. A
    suspension covers the data that exists when it is made (SPEC §3): every queued
    personal item goes, whenever it was captured (before the suspension, or after it
    by an offline device that had not heard of it), and none of it ever leaves.
    """
    control = dataclasses.replace(s.control, suspended=value, suspension=stamp)
    after = s.with_control(control)
    if s.control.suspended == value:
        return Plan(after, save=False)
    bound = s.lifecycle is not State.FACTORY_NEW
    action = "suspend" if value else "resume"
    plan = Plan(
        after,
        save=False,  # the control record holds it, and the shell writes it when it changed
        purge=tuple(Purge(p, DropReason.SUSPENDED) for p in Purpose) if value else (),
        ledger=(_consent_entry(cfg, action, None, now, source),) if bound else (),
        stop=ALL if value else frozenset(),
    )
    return plan if value else _then_activate(plan, cfg, now=now, msg_id=msg_id)


# -- a narrowing heard after a later widening (SPEC §3) ------------------------------
def captured_before(s: Settings, latest: Stamp, now: float) -> float:
    """The device time before which an item may have been captured before ``latest``
    (a later change of a setting) was made: ``latest`` on the device's clock, plus
    every error that conversion may carry. Where the clock was never compared, the
    order of anything captured until ``now`` is unknown: all of it (fail closed)."""
    clock = s.control.clock
    if clock is None or latest.error is None:
        return now
    return clock.to_device(latest.at) + latest.error + clock.error_at(now)


def withdrawn_earlier(s: Settings, purpose: Purpose, *, before: float) -> Plan:
    """A withdrawal made before the latest grant, heard only now: the grant stays, but
    nothing of ``purpose`` captured before that grant may leave (P2, SPEC §3)."""
    if s.lifecycle is State.FACTORY_NEW:
        return unchanged(s)
    return Plan(
        s,
        save=False,
        purge=(Purge(purpose, DropReason.WITHDRAWN, before),),
        stop=frozenset({purpose}),
    )


def suspended_earlier(s: Settings, *, before: float) -> Plan:
    """A suspension made before the latest resume, heard only now: collection stays
    resumed, but nothing captured before that resume may leave (P13, SPEC §3)."""
    return Plan(
        s,
        save=False,
        purge=tuple(Purge(p, DropReason.SUSPENDED, before) for p in Purpose),
        stop=ALL,
    )


def coarsened_earlier(s: Settings, precision: Precision, *, before: float) -> Plan:
    """A coarser precision (or ``off``) chosen before the latest precision change, heard
    only now: the precision stays, but the queued activations captured before that
    change and the stored location get no finer than ``precision`` (P3, SPEC §3).

    The stored location is coarsened whenever it was taken: when it was taken is not
    kept, so it may predate the choice (fail closed)."""
    after = dataclasses.replace(s, location=recoarsen(s.location, precision))
    return Plan(
        after,
        save=after.location != s.location,
        recoarsen=(Recoarsen(precision, before),),
        stop=frozenset({Purpose.ACTIVATION}),
    )


# -- location ---------------------------------------------------------------------
def is_coarser(new: Precision, old: Precision) -> bool:
    """Whether ``new`` allows less location than ``old`` (``off`` allows none)."""
    rank = {Precision.OFF: -1, **DECIMALS}
    return rank[new] < rank[old]


def set_precision(
    s: Settings, precision: Precision, *, now: float, stamp: Stamp | None = None
) -> Plan:
    """Change the location precision; a stored location can only get coarser (P3).

    A coarser precision reaches the activations already queued before this returns:
    their location is re-coarsened (or removed, for ``off``), and any activation the
    transport holds stops leaving.
    """
    after = dataclasses.replace(
        s, precision=precision, location=recoarsen(s.location, precision)
    ).stamped("precision", stamp or local_stamp(s, now))
    if not is_coarser(precision, s.precision):
        return Plan(after)
    return Plan(after, recoarsen=(Recoarsen(precision),), stop=frozenset({Purpose.ACTIVATION}))


def set_location(s: Settings, lat: float, lon: float) -> Plan:
    """Take a position; it is coarsened here, the exact value is never kept (P3)."""
    return Plan(dataclasses.replace(s, location=coarsen(lat, lon, s.precision)))


def recoarsened(payload: bytes, precision: Precision) -> bytes:
    """A queued activation's payload with its location no finer than ``precision`` (P3)."""
    doc = json.loads(payload)
    loc = doc["data"].get("location")
    if loc is not None:
        old = CoarseLocation(float(loc["lat"]), float(loc["lon"]), Precision(loc["precision"]))
        new = recoarsen(old, precision)
        doc["data"]["location"] = None if new is None else new.to_json()
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


# -- capture ----------------------------------------------------------------------
def _capture(
    cfg: CoreConfig,
    purpose: Purpose,
    data: dict[str, Any],
    grant: Grant,
    *,
    now: float,
    msg_id: str,
) -> Capture:
    payload = build_envelope(
        kind=POLICIES[purpose].kind,
        msg_id=msg_id,
        device_id=cfg.device_id,
        captured_at=now,
        data=data,
        receipt=grant.receipt(),
    )
    return Capture(msg_id, purpose, now, payload)


def crash(s: Settings, cfg: CoreConfig, report: CrashReport, *, now: float, msg_id: str) -> Plan:
    """Queue crash diagnostics if diagnostics consent is in force (P1, P12)."""
    decision = decide(s, Purpose.DIAGNOSTICS)
    if not decision.allowed or decision.grant is None:
        raise ConsentNotInForce(Purpose.DIAGNOSTICS.value, decision.reason.value)
    # Minimal by structure: exception type and frames; the crash text is dropped.
    structure = crashes.minimal(report.signature, report.stack, secrets=(cfg.serial, cfg.device_id))
    data = {
        "ip_addresses": list(report.ip_addresses),
        "default_gateway": report.default_gateway,
        "routes": list(report.routes),
        **structure,
        "firmware_version": cfg.firmware_version,
        "uptime_s": float(report.uptime_s),
    }
    capture = _capture(cfg, Purpose.DIAGNOSTICS, data, decision.grant, now=now, msg_id=msg_id)
    return Plan(s, save=False, capture=capture)


# -- hand-off -----------------------------------------------------------------------
HandOff = Literal["send", "hold", "expired"]


def may_send(s: Settings, purpose: Purpose, captured_at: float, now: float) -> HandOff:
    """At hand-off: send, hold (no consent in force now) or expired (P7: never sent)."""
    if not decide(s, purpose).allowed:
        return "hold"
    if expired(purpose, captured_at, now):
        return "expired"
    return "send"
