"""The ground truth of one simulated device: the user's choices as the fleet carried
them out (local actions at the time the user acted, cloud commands at the time the
cloud issued them), what its outbox did, and what an observer at the broker saw.
The checker judges what arrived against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.core.items import DropReason
from agent.core.purposes import (
    Purpose,
)


@dataclass
class DeviceTruth:
    """What happened to one device, as the fleet carried it out."""

    device_id: str
    group: str
    policy_version: str
    # How long after the device heard a narrowing choice an item it wrote before may
    # still reach the broker (the in-flight window).
    grace_s: float = 2.0
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    queued_items: dict[str, tuple[Purpose, float]] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    dropped_items: set[str] = field(default_factory=set)
    pending_at_end: set[str] = field(default_factory=set)
    deletion_requests_pending: int = 0  # at the end of the run, not yet acknowledged
    # When an observer at the broker first saw each message (a capture), if one ran.
    seen_at: dict[str, float] = field(default_factory=dict)
    # When the observer subscribed to the device's down/ first saw each cloud command
    # (by command_id): when the broker forwarded it, so the earliest the device heard it.
    delivered: dict[str, float] = field(default_factory=dict)
    # When the cloud's first send of each command that may have reached the broker
    # began (by command_id): the earliest the device can have heard it, where no
    # observer saw it go down. Later than its issue when the cloud's connection broke
    # and it was sent again on the next one.
    sent: dict[str, float] = field(default_factory=dict)

    # -- what the device tells us (agent.device.DeviceObserver) ------------------
    def queued(self, msg_id: str, purpose: Purpose, at: float) -> None:
        """The device queued an item with consent."""
        self.queued_items[msg_id] = (purpose, at)

    def acknowledged(self, msg_id: str, at: float) -> None:
        """The broker acknowledged an item."""
        self.acked[msg_id] = at

    def dropped(self, msg_ids: list[str], reason: DropReason) -> None:
        """The device deleted items unsent, for a reason (not lost)."""
        self.dropped_items.update(msg_ids)

    def sendable(self) -> None:
        """Not part of the ground truth."""

    def stopped(self, purposes: frozenset[Purpose]) -> None:
        """Not part of the ground truth."""

    def log(self, t: float, what: str, **info: Any) -> None:
        """Record the user's choice (or a device event) at real time ``t``."""
        self.events.append((t, what, info))

    def real_time(self, device_t: float) -> float:
        """A time the device stamped (``captured_at``), on the real clock: the device's
        clock ran ``offset_s`` ahead from each ``clock`` event on."""
        shifts = [(t, float(i["offset_s"])) for t, w, i in self.events if w == "clock"]
        offset = 0.0
        for t, off in sorted(shifts):
            if device_t - off >= t:
                offset = off
        return device_t - offset
