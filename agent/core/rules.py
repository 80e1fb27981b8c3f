"""The device's rules: events in, plans out (the h11 way).

Pure: no I/O, no clock, no randomness. Each rule takes the device's ``Settings``
(the sealed state record), its ``CoreConfig`` and one event with its ``now`` and
any msg_id the shell minted, and returns a ``Plan``: the new settings and what
the shell must carry out. ``agent.device.Device`` carries a plan out on the store
in one transaction, in this order: wipe, purge, capture, ledger, save; then it
stops the hand-off of what may no longer leave and tells its observers.

Every capture and every hand-off is decided by ``consent.decide`` (P1): here at
capture, and in ``may_send`` at hand-off.

Past 400 lines on purpose: every rule that changes the settings record is here, so
a reader sees every transition of the device in one place, as in h11's state module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core import consent, ledger, lifecycle
from agent.core.consent import ConsentState, Decision, Grant, Source
from agent.core.identity import validate_device_id
from agent.core.items import DropReason, expired
from agent.core.lifecycle import Event, State
from agent.core.location import (
    DEFAULT_PRECISION,
    CoarseLocation,
    Precision,
    coarsen,
    recoarsen,
)
from agent.core.purposes import DELETION_KIND, POLICIES, Purpose, build_envelope, rfc3339
from agent.core.scrub import scrub
from agent.errors import ConsentNotInForce, SchemaError

MAX_BINDING_ID = 128


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What the rules need to know about the device and the policy."""

    device_id: str
    serial: str
    model: str
    firmware_version: str
    policy_version: str = "1"
    outbox_cap: int = 10_000

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if self.outbox_cap < 1:
            raise SchemaError(f"outbox_cap must be at least 1, not {self.outbox_cap}")


@dataclass(frozen=True, slots=True)
class CrashReport:
    """What a collector knows about a crash; the rules scrub and gate it."""

    signature: str
    stack: str
    ip_addresses: tuple[str, ...] = ()
    default_gateway: str | None = None
    routes: tuple[dict[str, Any], ...] = ()
    uptime_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Settings:
    """The sealed state record: lifecycle, binding, consent, location."""

    consent: ConsentState
    lifecycle: State = State.FACTORY_NEW
    activation_trigger: str | None = None
    binding_id: str | None = None
    precision: Precision = DEFAULT_PRECISION
    location: CoarseLocation | None = None
    firmware_version: str | None = None  # the firmware that wrote the record

    @classmethod
    def fresh(cls, policy_version: str) -> Settings:
        """A factory-new device: bound to nobody, nothing granted (opt-in, P1)."""
        return cls(consent=ConsentState(policy_version=policy_version))

    def to_json(self) -> dict[str, Any]:
        """The record as sealed in the store."""
        loc, c = self.location, self.consent
        return {
            "lifecycle": self.lifecycle.value,
            "activation_trigger": self.activation_trigger,
            "binding_id": self.binding_id,
            "precision": self.precision.value,
            "location": None if loc is None else [loc.lat, loc.lon, loc.precision.value],
            "firmware_version": self.firmware_version,
            "suspended": c.suspended,
            "minor": c.minor,
            "grants": {
                p.value: [g.granted_at, g.policy_version, g.source] for p, g in c.grants.items()
            },
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], policy_version: str) -> Settings:
        """The record as read back; ``policy_version`` is the one configured now (P6)."""
        loc = raw.get("location")
        # "bound" is how records written before the state was renamed name it.
        state = State({"bound": "activation-due"}.get(raw["lifecycle"], raw["lifecycle"]))
        return cls(
            consent=ConsentState(
                policy_version=policy_version,
                bound=state is not State.FACTORY_NEW,
                minor=bool(raw.get("minor", False)),
                suspended=bool(raw.get("suspended", False)),
                grants={
                    Purpose(p): Grant(Purpose(p), float(g[0]), str(g[1]), g[2])
                    for p, g in raw.get("grants", {}).items()
                },
            ),
            lifecycle=state,
            activation_trigger=raw.get("activation_trigger"),
            binding_id=raw.get("binding_id"),
            precision=Precision(raw.get("precision", DEFAULT_PRECISION.value)),
            location=None if loc is None else CoarseLocation(loc[0], loc[1], Precision(loc[2])),
            firmware_version=raw.get("firmware_version"),
        )


@dataclass(frozen=True, slots=True)
class Purge:
    """Delete every queued item of ``purpose``, for ``reason``."""

    purpose: Purpose
    reason: DropReason


@dataclass(frozen=True, slots=True)
class Capture:
    """A new item to queue: its sealed payload is built, the shell stores it."""

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
    capture: Capture | None = None
    ledger: tuple[dict[str, Any], ...] = ()
    wipe: Wipe | None = None
    # Purposes whose items handed to the transport no longer count as in flight (P13).
    hold: frozenset[Purpose] = field(default_factory=frozenset)

    @property
    def noop(self) -> bool:
        """Whether the event changed nothing at all."""
        return not (self.save or self.purge or self.capture or self.ledger or self.wipe)


def unchanged(s: Settings) -> Plan:
    """A plan that carries out nothing."""
    return Plan(s, save=False)


def decide(s: Settings, purpose: Purpose) -> Decision:
    """The single gate: may an item of ``purpose`` be captured or sent now?"""
    return consent.decide(s.consent, purpose)


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
    if act.noop:
        return plan
    return dataclasses.replace(plan, settings=act.settings, capture=act.capture, save=True)


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
    if not binding_id or len(binding_id) > MAX_BINDING_ID:
        raise SchemaError(f"binding_id must be 1 to {MAX_BINDING_ID} characters")
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
    plan = Plan(after, purge=superseded(after))
    return _then_activate(plan, cfg, now=now, msg_id=msg_id)


def wipe(s: Settings, cfg: CoreConfig, event: Event, *, now: float, msg_id: str) -> Plan:
    """P9 wipe and P10 deletion request (unbind, factory reset, account cancellation)."""
    step = lifecycle.step(s.lifecycle, event)
    reason = lifecycle.WIPE_REASONS[event]
    request = None
    if step.effect == "wipe" and s.binding_id is not None:
        payload = build_envelope(
            kind=DELETION_KIND,
            msg_id=msg_id,
            device_id=cfg.device_id,
            captured_at=now,
            data={"binding_id": s.binding_id, "reason": reason, "requested_at": rfc3339(now)},
            receipt=None,
        )
        request = (msg_id, now, payload)
    after = Settings(consent=consent.unbound(s.consent))
    return Plan(after, save=False, wipe=Wipe(reason, step.effect == "wipe", request))


# -- consent ----------------------------------------------------------------------
def grant(
    s: Settings, cfg: CoreConfig, purpose: Purpose, *, now: float, source: Source, msg_id: str
) -> Plan:
    """Grant consent for a purpose; unchanged if it was already in force."""
    if s.lifecycle is State.FACTORY_NEW:
        raise ConsentNotInForce(purpose.value, "the device is not bound to an owner")
    after = consent.grant(s.consent, purpose, now=now, source=source)
    if after is s.consent:
        return unchanged(s)
    plan = Plan(
        dataclasses.replace(s, consent=after),
        purge=(Purge(purpose, DropReason.SUPERSEDED),),
        ledger=(_consent_entry(cfg, "grant", purpose, now, source),),
    )
    return _then_activate(plan, cfg, now=now, msg_id=msg_id)


def withdraw(s: Settings, cfg: CoreConfig, purpose: Purpose, *, now: float, source: Source) -> Plan:
    """Withdraw consent (P2): the gate closes and every pending item of it goes."""
    if s.lifecycle is State.FACTORY_NEW:
        return unchanged(s)
    return Plan(
        dataclasses.replace(s, consent=consent.withdraw(s.consent, purpose)),
        purge=(Purge(purpose, DropReason.WITHDRAWN),),
        ledger=(_consent_entry(cfg, "withdraw", purpose, now, source),),
    )


def suspension(
    s: Settings, cfg: CoreConfig, value: bool, *, now: float, source: Source, msg_id: str
) -> Plan:
    """Suspend (P13) or resume all personal-data collection."""
    if s.lifecycle is State.FACTORY_NEW or s.consent.suspended == value:
        return unchanged(s)
    plan = Plan(
        dataclasses.replace(s, consent=consent.suspended(s.consent, value)),
        ledger=(_consent_entry(cfg, "suspend" if value else "resume", None, now, source),),
        hold=frozenset(Purpose) if value else frozenset(),
    )
    if value:
        return plan
    return _then_activate(plan, cfg, now=now, msg_id=msg_id)


# -- location ---------------------------------------------------------------------
def set_precision(s: Settings, precision: Precision) -> Plan:
    """Change the location precision; a stored location can only get coarser (P3)."""
    return Plan(
        dataclasses.replace(s, precision=precision, location=recoarsen(s.location, precision))
    )


def set_location(s: Settings, lat: float, lon: float) -> Plan:
    """Take a position; it is coarsened here, the exact value is never kept (P3)."""
    return Plan(dataclasses.replace(s, location=coarsen(lat, lon, s.precision)))


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
    data = {
        "ip_addresses": list(report.ip_addresses),
        "default_gateway": report.default_gateway,
        "routes": list(report.routes),
        "signature": scrub(report.signature)[:256] or "unknown",
        "stack": scrub(report.stack),
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
