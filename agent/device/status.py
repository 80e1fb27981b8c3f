"""What a device shows of itself: the CLI's ``status`` and the control socket's, with
no personal values."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.core.purposes import Purpose

if TYPE_CHECKING:
    from agent.device.device import Device


def summary(device: Device) -> dict[str, Any]:
    """Lifecycle, consent, location, outbox counts and the store's health."""
    s, store = device.settings, device.store
    return {
        "device_id": device.device_id,
        "lifecycle": s.lifecycle.value,
        "activation_due": s.activation_trigger,
        "minor": s.consent.minor,
        "suspended": s.control.suspended,
        "clock_offset_s": None if s.control.clock is None else round(s.control.clock.offset, 3),
        "policy_version": device.config.policy_version,
        "consent": {p.value: device.decide(p).reason.value for p in Purpose},
        "precision": s.precision.value,
        "location_set": s.location is not None,
        "queued": device.queued_count(),
        "in_flight": len(device.in_flight()),
        "deletion_requests_pending": _read_or_none(device, lambda: len(store.deletion_requests())),
        "deletion_requests_recreated": store.deletions_recreated,
        "deletion_requests_lost": store.deletions_lost,
        "quarantined": _read_or_none(device, store.quarantined),
        "dropped": {r.value: n for r, n in device.dropped.items() if n},
        "storage": storage(device),
    }


def storage(device: Device) -> dict[str, Any]:
    """The store's health; ``ok`` false while anything is not durable or the last write
    failed."""
    problem, plans = device.health.problem, device.plans
    return {
        "ok": not device.needs_settling,
        "kind": None if problem is None else problem.kind,
        "error": None if problem is None else str(problem),
        "safe_mode": plans.safe_mode,
        "wipe_pending": plans.wipe.pending is not None,
        "narrowing_not_durable": len(plans.unsettled_plans),
        "acknowledgements_not_recorded": device.handoff.unrecorded,
    }


def _read_or_none(device: Device, read: Callable[[], int]) -> int | None:
    """A count read from the store, or None when the store cannot say (noted)."""
    with device.health.noted():
        return read()
    return None
