"""The items the device makes: its activation, crash diagnostics, the deletion request.

An activation (P4: the only message with a location, once per trigger) and crash
diagnostics (P12: minimal by structure) are built only while their consent is in
force (P1, ``agent.core.gate``), with that grant's receipt in the envelope. The
deletion request (P10) is the only message made without consent: a wipe
(``agent.core.rules``) builds it for the binding it deletes.

Each payload is built and validated here (``purposes.build_envelope``); the shell
seals and stores it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.core import crashes, lifecycle
from agent.core.consent import Grant
from agent.core.gate import decide
from agent.core.lifecycle import Event, State
from agent.core.location import recoarsen
from agent.core.plans import Capture, Plan, unchanged
from agent.core.purposes import DELETION_KIND, POLICIES, Purpose, build_envelope, rfc3339
from agent.core.settings import CoreConfig, CrashReport, Settings
from agent.errors import ConsentNotInForce


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


def then_activate(plan: Plan, cfg: CoreConfig, *, now: float, msg_id: str) -> Plan:
    """``plan``, followed by the activation it may have made possible."""
    act = activation(plan.settings, cfg, now=now, msg_id=msg_id)
    return plan if act.noop else plan.then(act)


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
