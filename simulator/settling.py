"""The end of a fleet's run: waiting for it to settle (every device idle, every item the
broker acknowledged at the backend), the broker's outage windows that excuse what it
lost, and what each device still held at the end (never lost, never sent)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable

from simulator.cloud import Cloud
from simulator.devices import SimDevice


def outages(
    restarts: Iterable[float], online_at: list[float], observer_back: list[float]
) -> list[tuple[float, float]]:
    """From each broker restart until the backend (``online_at``: when it subscribed)
    and an observer capturing beside it (``observer_back``; empty: none) had subscribed
    again: what the broker acknowledged before the end of such a window may have been
    lost with it (the broker's custody, not the device's)."""
    return [
        (
            t,
            max(
                min((o for o in online if o > t), default=float("inf"))
                for online in (online_at, observer_back or [t])
            ),
        )
        for t in restarts
    ]


async def drain(
    devices: Collection[SimDevice],
    cloud: Cloud,
    settle_s: float,
    windows: Callable[[], list[tuple[float, float]]],
) -> bool:
    """Wait up to ``settle_s`` until every device is idle and the backend has every
    acknowledged item, but those acknowledged before the end of one of the broker's
    outage ``windows``; False if it never did."""
    deadline = time.monotonic() + settle_s
    arrived: set[str | None] = set()
    counted = 0
    while time.monotonic() < deadline:
        received = cloud.received
        arrived.update(r.msg_id for r in received[counted:])
        counted = len(received)
        # Idle, and every cloud command taken: one still on its way may yet wipe
        # a device and make a deletion request.
        idle = all(
            d.transport.idle.is_set() and d.transport.connected.is_set() and not d.issued
            for d in devices
        )
        outage = windows()
        if idle and all(
            m in arrived or any(t < end for _start, end in outage)
            for d in devices
            for m, t in d.truth.acked.items()
        ):
            return True
        await asyncio.sleep(0.5)
    return False


def note_pending(devices: Iterable[SimDevice]) -> None:
    """What each device still holds at the end: never lost, never sent."""
    for dev in devices:
        dev.core.reap_all()  # shredded items: the ground truth hears of each
        requests = dev.core.store.deletion_requests()
        dev.truth.deletion_requests_pending = len(requests)
        dev.truth.pending_at_end = set(dev.core.store.msg_ids()) | {r.msg_id for r in requests}


def stopped_early(devices: Iterable[SimDevice]) -> None:
    """A run stopped early: nothing a device still held counts as lost, and no wipe as
    missing its deletion request."""
    for dev in devices:
        truth = dev.truth
        truth.pending_at_end |= set(truth.queued_items) - truth.dropped_items
        truth.deletion_requests_pending = max(
            truth.deletion_requests_pending,
            sum(1 for _at, what, _info in truth.events if what == "wipe"),
        )
