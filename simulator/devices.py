"""The devices of a simulated fleet: which devices a scenario has (and which of them a
shard plays), one simulated device (its agent's core and transport, its ground truth,
its own clock), what it tells its truth on the real clock, and the crashes it has."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TypeVar

from agent.core.items import DropReason
from agent.core.purposes import Purpose
from agent.device import CrashReport, Device
from agent.runtime.collectors import parse_crash_file
from agent.runtime.target import BrokerTarget
from agent.runtime.transport import Transport
from simulator.scenario import Group, Scenario
from simulator.truth import DeviceTruth

_T = TypeVar("_T")


def crash_report(text: str | None, k: int) -> CrashReport:
    """A crash as the collector reads it from a crash file (``text``), or a plain one."""
    if text is None:
        return CrashReport(
            signature=f"SIGSEGV in sim #{k}",
            stack='Traceback (most recent call last):\n  File "/home/sim/app.py"',
            ip_addresses=("10.0.0.2",),
            default_gateway="10.0.0.1",
            uptime_s=float(k),
        )
    signature, stack, uptime = parse_crash_file(text.encode())
    return CrashReport(signature, stack, ("10.0.0.2",), "10.0.0.1", uptime_s=uptime)


def scenario_devices(scenario: Scenario, n: int) -> list[tuple[Group, str]]:
    """Every device of a run of ``scenario`` with ``n`` devices: its group and ID."""
    return [
        (g, f"sim-{g.name}-{i:05d}")
        for g, size in zip(scenario.groups, scenario.sizes(n), strict=True)
        for i in range(size)
    ]


def shard_of(devices: list[_T], shard: tuple[int, int]) -> list[_T]:
    """Shard K of N (K = 1..N): every Nth of ``devices``, starting at the Kth."""
    k, n = shard
    return devices[k - 1 :: n]


@dataclass
class SimDevice:
    """One simulated device: its core, transport and ground truth."""

    device_id: str
    group: Group
    core: Device
    transport: Transport
    truth: DeviceTruth
    target: BrokerTarget  # where its transport connects
    task: asyncio.Task[None] | None = None
    binds: int = 0
    clock_offset: float = 0.0  # the device clock minus real time (a ``clock`` event)
    # Issue times of the cloud commands on their way to the device, in order (None: a
    # replay, which is not the user's choice); the device takes them in that order.
    issued: list[float | None] = field(default_factory=list)

    def now(self) -> float:
        """The device's own clock."""
        return time.time() + self.clock_offset


@dataclass(frozen=True, slots=True)
class OnRealTime:
    """What a device tells its ground truth, with the times it gives on its own clock
    (which a ``clock`` event moves) put back on the real one: the truth, the checker
    and every other piece of evidence (the observer, the backend, the outage windows)
    keep real time. A PUBACK on the clock of a device eight days fast had the checker
    take the item for one that left eight days late."""

    dev: SimDevice

    def queued(self, msg_id: str, purpose: Purpose, at: float) -> None:
        """An item queued with consent, at real time."""
        self.dev.truth.queued(msg_id, purpose, at - self.dev.clock_offset)

    def acknowledged(self, msg_id: str, at: float) -> None:
        """The broker acknowledged an item, at real time."""
        self.dev.truth.acknowledged(msg_id, at - self.dev.clock_offset)

    def dropped(self, msg_ids: list[str], reason: DropReason) -> None:
        """Items deleted unsent."""
        self.dev.truth.dropped(msg_ids, reason)

    def sendable(self) -> None:
        """Not part of the ground truth."""

    def stopped(self, purposes: frozenset[Purpose]) -> None:
        """Not part of the ground truth."""
