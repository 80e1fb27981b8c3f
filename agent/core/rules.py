"""The device's rules: events in, plans out (the h11 way).

Pure: no I/O, no clock, no randomness. Each rule takes the device's ``Settings``
(``agent.core.settings``), its ``CoreConfig`` and one event with its ``now`` and
any msg_id the shell minted, and returns a ``Plan`` (``agent.core.plans``): the new
settings and what the shell must carry out. ``agent.device.Device`` carries a plan
out on the store in one transaction (purge, re-coarsen, capture, ledger, save), then
tells the transport which purposes must stop leaving at once (``Plan.stop``).

This module holds the events of the device's life (bind, firmware update, policy
change, wipe) and of its owner's consent (grant, withdraw, suspend, resume). Callers
take every rule from it; the others live by job and are named here:

* ``agent.core.gate``: the one gate, ``decide``, and the hand-off check ``may_send``;
* ``agent.core.capture``: the activation, crash diagnostics and deletion request;
* ``agent.core.precision``: the location precision and re-coarsening (P3);
* ``agent.core.stamps``: when each setting changed, and narrowings heard late.

Every capture and every hand-off is decided by ``consent.decide`` (P1): at capture in
``agent.core.capture``, and in ``may_send`` at hand-off. Cloud commands are decided
in ``agent.core.cloud``, which calls these rules with the command's stamp.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.core import consent, ledger, lifecycle
from agent.core.capture import activation, crash, deletion_request, then_activate
from agent.core.consent import Source
from agent.core.gate import SendVerdict, decide, may_send, purge_superseded, superseded
from agent.core.identity import safe_binding_id, validate_binding_id
from agent.core.items import DropReason
from agent.core.lifecycle import Event, State
from agent.core.ordering import Stamp
from agent.core.plans import ALL, Capture, Plan, Purge, Recoarsen, Wipe, unchanged
from agent.core.precision import is_coarser, recoarsened, set_location, set_precision
from agent.core.purposes import Purpose
from agent.core.settings import CoreConfig, CrashReport, Settings
from agent.core.stamps import (
    captured_before,
    clock_compared,
    coarsened_earlier,
    local_stamp,
    suspended_earlier,
    withdrawn_earlier,
)
from agent.errors import ConsentNotInForce

__all__ = [
    "Capture",
    "CoreConfig",
    "CrashReport",
    "Plan",
    "Purge",
    "Recoarsen",
    "SendVerdict",
    "Settings",
    "Wipe",
    "activation",
    "bind",
    "captured_before",
    "clock_compared",
    "coarsened_earlier",
    "crash",
    "decide",
    "deletion_request",
    "firmware_updated",
    "grant",
    "is_coarser",
    "local_stamp",
    "may_send",
    "policy_changed",
    "purge_superseded",
    "recoarsened",
    "set_location",
    "set_precision",
    "superseded",
    "suspended_earlier",
    "suspension",
    "unchanged",
    "wipe",
    "withdraw",
    "withdrawn_earlier",
]


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


# -- lifecycle ------------------------------------------------------------------
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
    return then_activate(Plan(after), cfg, now=now, msg_id=msg_id)


def firmware_updated(s: Settings, cfg: CoreConfig, *, now: float, msg_id: str) -> Plan:
    """``cfg`` names a new firmware: a fresh activation is due if the device is bound."""
    step = lifecycle.step(s.lifecycle, Event.FIRMWARE_UPDATE)
    if step.effect != "activation-due":
        return unchanged(s)
    after = dataclasses.replace(s, lifecycle=step.state, activation_trigger="firmware-update")
    return then_activate(Plan(after), cfg, now=now, msg_id=msg_id)


def policy_changed(s: Settings, cfg: CoreConfig, *, now: float, msg_id: str) -> Plan:
    """``cfg`` names a new privacy policy: earlier grants stop counting (P6)."""
    after = dataclasses.replace(
        s, consent=consent.with_policy_version(s.consent, cfg.policy_version)
    )
    plan = Plan(after, purge=superseded(after), stop=ALL)
    return then_activate(plan, cfg, now=now, msg_id=msg_id)


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
    return then_activate(plan, cfg, now=now, msg_id=msg_id)


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
    return plan if value else then_activate(plan, cfg, now=now, msg_id=msg_id)
