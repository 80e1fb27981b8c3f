"""The timeline's schedule: when each event is due for each device (or group), how late
the fleet carried each one out, and whether a run that late still has a verdict.

``plan`` and ``late`` are plain code (the jitter comes from the fleet's seeded
generator, the lateness from the caller); ``Pace`` is the timeline's clock: it waits
until each event is due, lets the other tasks run during a burst, and notes how late
each event was.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from simulator.devices import SimDevice
from simulator.sampling import FleetStats
from simulator.scenario import BrokerRestart, Event, Fault, Scenario

# The timeline's own work (a burst of captures, a thousand devices' binds due at once)
# holds the event loop at most this long before the transports and the cloud get a
# turn: PUBACKs, commands and keepalives are then late by tens of milliseconds, not by
# the whole burst (200 crashes on each of 120 devices held it for about 12 s).
HOLD_S: Final = 0.02
# A scheduled event carried out later than this gets no verdict (``late``). The
# scenarios space the choices whose order is their point about a second or more apart
# (a capture burst, then the suspension or withdrawal that must cover it; a suspension,
# then its resume), so a run further behind no longer plays what its file says, and
# its verdict would be about another scenario: it says so instead of giving one.
MAX_LAG_S: Final = 1.0


def late(max_lag_s: float, latest: str) -> str | None:
    """Why a run that fell ``max_lag_s`` behind its schedule gets no verdict (``latest``:
    the event that was carried out latest), or None when it kept its schedule."""
    if max_lag_s <= MAX_LAG_S:
        return None
    return (
        f"the fleet fell {max_lag_s:.1f} s behind the scenario's schedule (at most "
        f"{MAX_LAG_S:g} s is allowed; the latest event: {latest}), so it did not play what "
        "the scenario says: run fewer devices, or spread the scenario's events out"
    )


@dataclass(frozen=True, slots=True)
class Planned:
    """One event of the timeline, due ``at`` seconds into it."""

    at: float
    order: int  # its place in the plan as made: events due at one time keep that order
    # The device's ID; for a fault or a broker restart, the name of the group that has it.
    target: str
    event: Event


def plan(scenario: Scenario, devices: Collection[SimDevice], rng: random.Random) -> list[Planned]:
    """Every event of ``scenario`` for each of ``devices`` (a fault or a broker restart
    once for its group), in the order it is due; a jittered event's time for each
    device drawn from ``rng``."""
    planned: list[Planned] = []
    order = 0
    for g in scenario.groups:
        members = [d for d in devices if d.group is g]
        for e in g.events:
            if isinstance(e, BrokerRestart | Fault):
                planned.append(Planned(e.at, order, g.name, e))
                order += 1
                continue
            for d in members:
                t = e.at + (rng.uniform(0, e.jitter_s) if e.jitter_s else 0.0)
                planned.append(Planned(t, order, d.device_id, e))
                order += 1
    planned.sort(key=lambda p: (p.at, p.order))
    return planned


class Pace:
    """The timeline's clock (monotonic time): it waits until each event is due, lets the
    other tasks run once the timeline has held the loop for HOLD_S, and notes in
    ``stats`` how late each event was carried out."""

    def __init__(self, stats: FleetStats) -> None:
        self.stats = stats
        self.t0 = 0.0  # when the timeline started
        self._held_since = 0.0  # when the timeline last let other tasks run

    def start(self) -> None:
        """The timeline starts now."""
        self.t0 = self._held_since = time.monotonic()

    def due(self, p: Planned) -> float:
        """The monotonic time ``p`` is due at."""
        return self.t0 + p.at

    async def until(self, due: float) -> None:
        """Wait until monotonic time ``due``; already behind, still let the devices run."""
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
            self._held_since = time.monotonic()
        else:
            await self.breathe()

    async def breathe(self) -> None:
        """Let the other tasks run once the timeline has held the loop for HOLD_S."""
        if time.monotonic() - self._held_since >= HOLD_S:
            await asyncio.sleep(0)
            self._held_since = time.monotonic()

    def on_time(self, due: float, e: Event, at: float, who: str) -> None:
        """Note how late an event scheduled for monotonic time ``due`` was carried out."""
        lag = max(0.0, time.monotonic() - due)
        self.stats.event_lags_s.append(lag)
        if lag > self.stats.max_lag_s:
            self.stats.max_lag_s = lag
            self.stats.latest = f"{e.action} at {at:.2f} s for {who}"
