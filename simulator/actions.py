"""What each of a scenario's actions does, by the way it comes: a local action on a
device's agent (``local_action``), a cloud command (``command``), a fault on a group's
path to the broker (``fault_on``); and the ``Player`` that carries out the timeline's
planned events with them, at their time.

Each records the ground truth the checker needs: a local action at the real time the
user acted, a cloud command at its issue time with its ``command_id``. Each handler
takes its action's model (``simulator.scenario``), which has the keys it needs; the
dispatches are ``match`` statements that mypy checks are exhaustive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, assert_never

from agent.core.location import Precision as Level
from agent.core.purposes import Purpose, parse_rfc3339, rfc3339
from agent.device import Device
from agent.errors import AgentError, CommandRejected
from simulator.cloud import Cloud
from simulator.devices import SimDevice, crash_report
from simulator.faults import FaultProxy
from simulator.sampling import FleetStats
from simulator.scenario import (
    AccountCancelled,
    Bind,
    BrokerRestart,
    Clock,
    Crash,
    FactoryReset,
    Fault,
    FirmwareUpdate,
    Grant,
    Latency,
    Location,
    Loss,
    Partition,
    PolicyVersion,
    Precision,
    Reboot,
    Replay,
    Resume,
    Suspend,
    Unbind,
    Withdraw,
)
from simulator.schedule import Pace, Planned

log = logging.getLogger("smartmi.sim.actions")

# -- local actions: the device acts at its own clock (``now``), the truth is ``real`` time.


def _bind(dev: SimDevice, e: Bind, now: float, real: float) -> None:
    dev.binds += 1
    dev.core.bind(f"{dev.device_id}-b{dev.binds}", now=now, minor=e.minor)
    dev.truth.log(real, "bind", minor=e.minor)


def _grant(dev: SimDevice, e: Grant, now: float, real: float) -> None:
    dev.core.grant(Purpose(e.purpose), now=now)
    dev.truth.log(real, "grant", purpose=e.purpose)


def _withdraw(dev: SimDevice, e: Withdraw, now: float, real: float) -> None:
    dev.core.withdraw(Purpose(e.purpose), now=now)
    dev.truth.log(real, "withdraw", purpose=e.purpose)


def _policy_version(dev: SimDevice, e: PolicyVersion, now: float, real: float) -> None:
    dev.truth.log(real, "policy-version", version=e.version)
    dev.core.set_policy_version(e.version, now=now)


def _location(dev: SimDevice, e: Location, now: float) -> None:
    dev.core.set_location(e.lat, e.lon, now=now)


def _precision(dev: SimDevice, e: Precision, now: float, real: float) -> None:
    dev.core.set_precision(Level(e.level), now=now)
    dev.truth.log(real, "precision", level=e.level)


def _firmware_update(dev: SimDevice, e: FirmwareUpdate, now: float) -> None:
    dev.core.firmware_updated(e.version, now=now)


def _clock(dev: SimDevice, e: Clock, real: float) -> None:
    dev.clock_offset += e.shift_s
    dev.truth.log(real, "clock", offset_s=dev.clock_offset)
    dev.core.sweep_retention(now=dev.now())  # the device's timer runs on its (new) clock


Wipe = Unbind | FactoryReset | AccountCancelled
_WIPES: Final = {
    "unbind": Device.unbind,
    "factory-reset": Device.factory_reset,
    "account-cancelled": Device.account_cancelled,
}


def _wipe(dev: SimDevice, e: Wipe, now: float, real: float) -> None:
    dev.truth.log(real, "wipe", reason=e.action)
    _WIPES[e.action](dev.core, now=now)


LocalEvent = (
    Bind | Grant | Withdraw | PolicyVersion | Location | Precision | FirmwareUpdate | Clock | Wipe
)


def local_action(dev: SimDevice, e: LocalEvent, real: float) -> None:
    """Carry out local action ``e`` on ``dev`` at real time ``real``."""
    now = real + dev.clock_offset
    match e:
        case Bind():
            _bind(dev, e, now, real)
        case Grant():
            _grant(dev, e, now, real)
        case Withdraw():
            _withdraw(dev, e, now, real)
        case PolicyVersion():
            _policy_version(dev, e, now, real)
        case Location():
            _location(dev, e, now)
        case Precision():
            _precision(dev, e, now, real)
        case FirmwareUpdate():
            _firmware_update(dev, e, now)
        case Clock():
            _clock(dev, e, real)
        case Unbind() | FactoryReset() | AccountCancelled():
            _wipe(dev, e, now, real)
        case _:
            assert_never(e)


# -- cloud commands: the ground truth is the user's choice at the command's issue time.


@dataclass(frozen=True, slots=True)
class Command:
    """A cloud command (``name``, ``body``), and what the ground truth logs of it."""

    name: str
    body: dict[str, Any]
    what: str
    info: dict[str, Any]


def _binding(core: Device, issued: float) -> dict[str, Any]:
    return {"binding_id": core.settings.binding_id or "not-bound", "issued_at": rfc3339(issued)}


def _consent(e: Grant | Withdraw, core: Device, issued: float) -> Command:
    body = {
        **_binding(core, issued),
        "purposes": {e.purpose: isinstance(e, Grant)},
        "policy_version": core.config.policy_version,
    }
    return Command("consent", body, e.action, {"purpose": e.purpose})


def _precision_command(e: Precision, core: Device, issued: float) -> Command:
    body = {**_binding(core, issued), "precision": e.level}
    return Command("location-precision", body, "precision", {"level": e.level})


def _wipe_command(e: Unbind | AccountCancelled, core: Device, issued: float) -> Command:
    return Command(e.action, _binding(core, issued), "wipe", {"reason": e.action})


def _collection(e: Suspend | Resume, issued: float) -> Command:
    return Command(f"{e.action}-collection", {"issued_at": rfc3339(issued)}, e.action, {})


CommandEvent = Grant | Withdraw | Precision | Unbind | AccountCancelled | Suspend | Resume


def command(e: CommandEvent, core: Device, issued: float) -> Command:
    """The cloud command that carries out ``e`` on ``core``, issued at ``issued``."""
    match e:
        case Grant() | Withdraw():
            return _consent(e, core, issued)
        case Precision():
            return _precision_command(e, core, issued)
        case Unbind() | AccountCancelled():
            return _wipe_command(e, core, issued)
        case Suspend() | Resume():
            return _collection(e, issued)
        case _:
            assert_never(e)


async def send_command(cloud: Cloud, dev: SimDevice, e: CommandEvent | Replay) -> None:
    """Issue cloud command ``e`` to ``dev`` now, logged with the command's ID (an
    observer on ``down/`` sees when the broker forwarded it, and the checker measures
    the command's path delay from there)."""
    issued = parse_rfc3339(rfc3339(time.time()))  # as the command carries it
    if isinstance(e, Replay):
        # Not the user's choice: the cloud's latest command to the device, again.
        last = next((c for c in reversed(cloud.issued) if c[0] == dev.device_id), None)
        if last is not None:
            dev.issued.append(None)
            await cloud.send_raw(dev.device_id, last[1], json.dumps(last[2]).encode())
        return
    made = command(e, dev.core, issued)
    dev.issued.append(issued)
    command_id, sending = cloud.issue(dev.device_id, made.name, made.body)
    dev.truth.log(issued, made.what, **made.info, via="cloud", command_id=command_id)
    dev.truth.sent[command_id] = await sending


def command_results(dev: SimDevice, stats: FleetStats) -> Callable[[str, Any, float], None]:
    """``dev``'s command listener: counts what each cloud command did on the device (the
    truth was logged when the cloud issued it, see ``send_command``)."""

    def listener(name: str, result: dict[str, Any] | CommandRejected, now: float) -> None:
        if dev.issued and name != "sync":
            issued = dev.issued.pop(0)
            if issued is not None:
                stats.command_delays_s.append(time.time() - issued)
        if isinstance(result, CommandRejected):
            stats.events_refused[f"{name}:{result.reason}"] += 1
        elif any(v == "applied" for v in result.values()):
            stats.events_applied += 1
        else:
            stats.events_refused[f"{name}:ignored"] += 1

    return listener


# -- faults: on a group's proxy for ``for_s``, then healed.


def fault_on(proxy: FaultProxy, e: Fault) -> None:
    """Start fault ``e`` on ``proxy``."""
    match e:
        case Latency():
            proxy.latency_s = e.ms / 1000
        case Loss():
            proxy.loss = e.rate
        case Partition():
            proxy.partition(True)
        case _:
            assert_never(e)


def heal(proxy: FaultProxy) -> None:
    """End every fault on ``proxy``."""
    proxy.partition(False)
    proxy.latency_s, proxy.loss = 0.0, 0.0


# -- the timeline ------------------------------------------------------------------------

PowerCycle = Callable[[SimDevice], Coroutine[Any, Any, None]]


class Player:
    """Plays a fleet's timeline: each planned event at its time, on the fleet's devices,
    its groups' fault proxies, its cloud or its broker, counted in ``stats`` as applied
    or refused. ``restart_broker`` is None where the broker is not the simulator's own;
    ``reboot`` powers a device's agent off and on."""

    def __init__(
        self,
        devices: dict[str, SimDevice],
        proxies: dict[str, FaultProxy],
        cloud: Cloud,
        stats: FleetStats,
        *,
        restart_broker: Callable[[], object] | None,
        reboot: PowerCycle,
    ) -> None:
        self.devices = devices
        self.proxies = proxies
        self.cloud = cloud
        self.stats = stats
        self.restart_broker = restart_broker
        self.reboot = reboot
        self.pace = Pace(stats)
        self._sending: set[asyncio.Task[None]] = set()
        self._restarting: asyncio.Task[None] | None = None  # the latest broker restart

    async def play(self, planned: list[Planned], duration_s: float) -> None:
        """Every planned event at its time, then the rest of the timeline; returns once
        what runs beside it (reboots, cloud commands, broker restarts) has finished."""
        self.stats.events_total = len(planned)
        self.pace.start()
        for p in planned:
            due = self.pace.due(p)
            await self.pace.until(due)
            await self.apply(p, due)
            self.stats.events_played += 1
        await asyncio.sleep(max(0.0, self.pace.t0 + duration_s - time.monotonic()))
        await asyncio.gather(*self._sending)

    async def apply(self, p: Planned, due: float) -> None:
        """Carry out ``p``'s event, scheduled at ``p.at`` seconds into the timeline, which
        is monotonic time ``due``."""
        e = p.event
        if isinstance(e, BrokerRestart):
            await self._broker_restart(p, due)
        elif isinstance(e, Reboot):
            await self._reboot(p, due)
        elif isinstance(e, Fault):
            await self._fault(p, e, due)
        elif e.via == "cloud":
            # Sent, not awaited: the cloud does not wait for one device before the next.
            self._background(self._command(self.devices[p.target], p, e, due))
        else:
            await self._local(p, e, due)

    async def _broker_restart(self, p: Planned, due: float) -> None:
        self.pace.on_time(due, p.event, p.at, "the broker")
        if self.restart_broker is None:
            self.stats.events_refused["broker-restart:external-broker"] += 1
            return
        # Beside the timeline: the users' choices do not wait for the broker to come
        # back (a restart took 0.3 s and more, and every event after it was as late).
        before = self._restarting
        self._restarting = self._background(self._restart(self.restart_broker, before))

    async def _restart(
        self, restart: Callable[[], object], before: asyncio.Task[None] | None
    ) -> None:
        """Restart the broker, after the restart before this one has finished."""
        if before is not None:
            await before
        self.stats.broker_restarts.append(time.time())
        await asyncio.to_thread(restart)
        self.stats.events_applied += 1

    async def _fault(self, p: Planned, e: Fault, due: float) -> None:
        self.pace.on_time(due, e, p.at, f"group {p.target}")
        asyncio.get_running_loop().create_task(self._fault_for(self.proxies[p.target], e))

    async def _fault_for(self, proxy: FaultProxy, e: Fault) -> None:
        fault_on(proxy, e)
        self.stats.events_applied += 1
        await asyncio.sleep(e.for_s)
        heal(proxy)

    async def _reboot(self, p: Planned, due: float) -> None:
        dev = self.devices[p.target]
        self.pace.on_time(due, p.event, p.at, p.target)
        # Not awaited: the agent's old connection closes while the timeline goes on.
        self._background(self.reboot(dev))
        self.stats.events_applied += 1

    async def _command(
        self, dev: SimDevice, p: Planned, e: CommandEvent | Replay, due: float
    ) -> None:
        self.pace.on_time(due, e, p.at, dev.device_id)  # issued now
        try:
            await send_command(self.cloud, dev, e)
        except (AgentError, TimeoutError) as exc:  # the broker stayed out of reach
            self.stats.commands_unsent += 1
            log.warning(
                "cloud command not sent",
                extra={
                    "device": dev.device_id,
                    "action": e.action,
                    "error": str(exc) or "timed out",
                },
            )

    async def _local(self, p: Planned, e: LocalEvent | Crash, due: float) -> None:
        dev = self.devices[p.target]
        try:
            if isinstance(e, Crash):
                await self._crash(dev, e)
            else:
                local_action(dev, e, time.time())
            self.stats.events_applied += 1
        except AgentError as exc:
            self.stats.events_refused[f"{e.action}:{type(exc).__name__}"] += 1
        self.pace.on_time(due, e, p.at, p.target)  # when it was done: a burst takes its time

    async def _crash(self, dev: SimDevice, e: Crash) -> None:
        """``e.count`` crashes captured one after another, each at the device's time, and
        the loop let go between them (``Pace.breathe``)."""
        for k in range(e.count):
            await self.pace.breathe()
            dev.core.capture_crash(crash_report(e.text, k), now=dev.now())

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` beside the timeline; ``play`` waits for all of it before it returns."""
        task = asyncio.create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return task
