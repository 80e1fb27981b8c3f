"""What a fleet's run measures (``FleetStats``), and its sample once a second: the
figures for the HTML report's charts, and the progress line from the same figures."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator.broker import memory_kib
from simulator.cloud import Cloud
from simulator.devices import SimDevice


def rss_kib() -> int:
    """This process's resident memory (KiB), from /proc; 0 where unavailable."""
    return memory_kib()


@dataclass
class FleetStats:
    """What the run measured, for the report."""

    connect_s: float | None = None
    connected: int = 0
    rss_baseline_kib: int = 0
    rss_fleet_kib: int = 0
    broker_peak_kib: int = 0  # the local broker's processes (VmHWM, summed); 0: not ours
    events_applied: int = 0
    events_refused: Counter[str] = field(default_factory=Counter)
    broker_restarts: list[float] = field(default_factory=list)
    # Transports that had not stopped STOP_WAIT_S after stop() (reported, not hidden).
    stuck_stops: int = 0
    # From a cloud command's issue to the device taking it: the path the grace covers.
    command_delays_s: list[float] = field(default_factory=list)
    # Cloud commands that never reached the broker (it stayed out of reach while the
    # cloud kept sending): the devices could not hear every choice, so no verdict.
    commands_unsent: int = 0
    # The timeline's events, and how many of them were played so far, applied or
    # refused (the progress line).
    events_total: int = 0
    events_played: int = 0
    # How late each scheduled event was carried out (a local action: when it was done; a
    # cloud command: when it was issued); the most, and which event that was.
    event_lags_s: list[float] = field(default_factory=list)
    max_lag_s: float = 0.0
    latest: str = ""
    drained: bool = False
    elapsed_s: float = 0.0
    started_at: float = 0.0  # wall clock
    # Once a second: (wall clock, devices connected, items published, acknowledged).
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)


class Sampler:
    """Samples a fleet's devices once a second into its ``FleetStats``, says how far the
    run has got (with ``say``; None: no progress line), and on the same tick ``flush``es
    the key store's rollback counters."""

    def __init__(
        self,
        devices: dict[str, SimDevice],
        cloud: Cloud,
        stats: FleetStats,
        *,
        say: Callable[[str], None] | None,
        flush: Callable[[], None],
    ) -> None:
        self.devices = devices  # filled while the fleet builds: read anew each tick
        self.cloud = cloud
        self.stats = stats
        self.say = say
        self.flush = flush
        self.phase = "building"  # the run's phase, for the progress line

    async def run(self, interval: float = 1.0) -> None:
        """The fleet's state every ``interval`` seconds, until cancelled."""
        while True:
            transports = [d.transport for d in self.devices.values()]
            up = sum(t.connected.is_set() for t in transports)
            self.stats.samples.append(
                (
                    round(time.time(), 3),
                    up,
                    sum(t.stats.published for t in transports),
                    sum(t.stats.acknowledged for t in transports),
                )
            )
            if self.say is not None:
                self._progress(self.say, up)
            self.flush()
            await asyncio.sleep(interval)

    def _progress(self, say: Callable[[str], None], up: int) -> None:
        s = self.stats
        queued = sum(d.core.queued_count() for d in self.devices.values())
        say(
            f"[{time.time() - s.started_at:6.1f}s] {self.phase:<9} connected {up}/"
            f"{len(self.devices)}  events {s.events_played}/{s.events_total}"
            f"  queued {queued}  received {len(self.cloud.received)}"
        )
