"""What each of a scenario's actions does, one table for each way it can come: a local
action on a device's agent (``LOCAL``), a cloud command (``COMMANDS``), a fault on a
group's path to the broker (``FAULTS_ON``); and the ``Player`` that carries out the
timeline's planned events with them, at their time.

Each records the ground truth the checker needs: a local action at the real time the
user acted, a cloud command at its issue time with its ``command_id``. The scenario's
validation (``simulator.scenario``) gives every event the keys its action needs, and
lets no action come from where it cannot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from agent.core.location import Precision
from agent.core.purposes import Purpose, parse_rfc3339, rfc3339
from agent.device import Device
from agent.errors import AgentError, CommandRejected
from simulator.cloud import Cloud
from simulator.devices import SimDevice, crash_report
from simulator.faults import FaultProxy
from simulator.sampling import FleetStats
from simulator.scenario import FAULTS, Event
from simulator.schedule import Pace, Planned

# -- local actions: the device acts at its own clock (``now``), the truth is ``real`` time.


def _bind(dev: SimDevice, e: Event, now: float, real: float) -> None:
    dev.binds += 1
    dev.core.bind(f"{dev.device_id}-b{dev.binds}", now=now, minor=e.minor)
    dev.truth.log(real, "bind", minor=e.minor)


def _grant(dev: SimDevice, e: Event, now: float, real: float) -> None:
    dev.core.grant(Purpose(str(e.purpose)), now=now)
    dev.truth.log(real, "grant", purpose=e.purpose)


def _withdraw(dev: SimDevice, e: Event, now: float, real: float) -> None:
    dev.core.withdraw(Purpose(str(e.purpose)), now=now)
    dev.truth.log(real, "withdraw", purpose=e.purpose)


def _policy_version(dev: SimDevice, e: Event, now: float, real: float) -> None:
    assert e.version is not None  # noqa: S101  # validated
    dev.truth.log(real, "policy-version", version=e.version)
    dev.core.set_policy_version(e.version, now=now)


def _location(dev: SimDevice, e: Event, now: float, real: float) -> None:
    assert e.lat is not None and e.lon is not None  # noqa: S101, PT018  # validated
    dev.core.set_location(e.lat, e.lon, now=now)


def _precision(dev: SimDevice, e: Event, now: float, real: float) -> None:
    dev.core.set_precision(Precision(str(e.level)), now=now)
    dev.truth.log(real, "precision", level=e.level)


def _firmware_update(dev: SimDevice, e: Event, now: float, real: float) -> None:
    assert e.version is not None  # noqa: S101  # validated
    dev.core.firmware_updated(e.version, now=now)


def _clock(dev: SimDevice, e: Event, now: float, real: float) -> None:
    assert e.shift_s is not None  # noqa: S101  # validated
    dev.clock_offset += e.shift_s
    dev.truth.log(real, "clock", offset_s=dev.clock_offset)
    dev.core.sweep_retention(now=dev.now())  # the device's timer runs on its (new) clock


_WIPES: Final = {
    "unbind": Device.unbind,
    "factory-reset": Device.factory_reset,
    "account-cancelled": Device.account_cancelled,
}


def _wipe(dev: SimDevice, e: Event, now: float, real: float) -> None:
    dev.truth.log(real, "wipe", reason=e.action)
    _WIPES[e.action](dev.core, now=now)


LocalAction = Callable[[SimDevice, Event, float, float], None]
LOCAL: Final[dict[str, LocalAction]] = {
    "bind": _bind,
    "grant": _grant,
    "withdraw": _withdraw,
    "policy-version": _policy_version,
    "location": _location,
    "precision": _precision,
    "firmware-update": _firmware_update,
    "clock": _clock,
    **dict.fromkeys(_WIPES, _wipe),
}


def local_action(dev: SimDevice, e: Event, real: float) -> None:
    """Carry out local action ``e`` on ``dev`` at real time ``real``."""
    act = LOCAL.get(e.action)
    if act is None:  # the scenario's validation keeps every other action from getting here
        raise CommandRejected("not-a-local-action", e.action)
    act(dev, e, real + dev.clock_offset, real)


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


def _consent(e: Event, core: Device, issued: float) -> Command:
    body = {
        **_binding(core, issued),
        "purposes": {e.purpose: e.action == "grant"},
        "policy_version": core.config.policy_version,
    }
    return Command("consent", body, e.action, {"purpose": e.purpose})


def _precision_command(e: Event, core: Device, issued: float) -> Command:
    body = {**_binding(core, issued), "precision": e.level}
    return Command("location-precision", body, "precision", {"level": e.level})


def _wipe_command(e: Event, core: Device, issued: float) -> Command:
    return Command(e.action, _binding(core, issued), "wipe", {"reason": e.action})


def _collection(e: Event, core: Device, issued: float) -> Command:
    return Command(f"{e.action}-collection", {"issued_at": rfc3339(issued)}, e.action, {})


COMMANDS: Final[dict[str, Callable[[Event, Device, float], Command]]] = {
    "grant": _consent,
    "withdraw": _consent,
    "precision": _precision_command,
    "unbind": _wipe_command,
    "account-cancelled": _wipe_command,
    "suspend": _collection,
    "resume": _collection,
}


async def send_command(cloud: Cloud, dev: SimDevice, e: Event) -> None:
    """Issue cloud command ``e`` to ``dev`` now, logged with the command's ID (an
    observer on ``down/`` sees when the broker forwarded it, and the checker measures
    the command's path delay from there)."""
    issued = parse_rfc3339(rfc3339(time.time()))  # as the command carries it
    if e.action == "replay":
        # Not the user's choice: the cloud's latest command to the device, again.
        last = next((c for c in reversed(cloud.issued) if c[0] == dev.device_id), None)
        if last is not None:
            dev.issued.append(None)
            await cloud.send_raw(dev.device_id, last[1], json.dumps(last[2]).encode())
        return
    make = COMMANDS.get(e.action)
    if make is None:
        raise CommandRejected("not-a-cloud-command", e.action)
    command = make(e, dev.core, issued)
    dev.issued.append(issued)
    command_id, sending = cloud.issue(dev.device_id, command.name, command.body)
    dev.truth.log(issued, command.what, **command.info, via="cloud", command_id=command_id)
    await sending


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


def _latency(proxy: FaultProxy, e: Event) -> None:
    proxy.latency_s = (e.ms or 0) / 1000


def _loss(proxy: FaultProxy, e: Event) -> None:
    proxy.loss = e.rate or 0.0


def _partition(proxy: FaultProxy, e: Event) -> None:
    proxy.partition(True)


FAULTS_ON: Final[dict[str, Callable[[FaultProxy, Event], None]]] = {
    "latency": _latency,
    "loss": _loss,
    "partition": _partition,
}


def heal(proxy: FaultProxy) -> None:
    """End every fault on ``proxy``."""
    proxy.partition(False)
    proxy.latency_s, proxy.loss = 0.0, 0.0


# -- the timeline ------------------------------------------------------------------------

Reboot = Callable[[SimDevice], Coroutine[Any, Any, None]]


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
        reboot: Reboot,
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
        # The actions carried out apart; any other is a cloud command or a local action.
        self._apart: dict[str, Callable[[Planned, float], Awaitable[None]]] = {
            "broker-restart": self._broker_restart,
            "reboot": self._reboot,
            **dict.fromkeys(FAULTS, self._fault),
        }

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
        apart = self._apart.get(p.event.action)
        if apart is not None:
            await apart(p, due)
        elif p.event.source == "cloud":
            # Sent, not awaited: the cloud does not wait for one device before the next.
            self._background(self._command(self.devices[p.target], p, due))
        else:
            await self._local(p, due)

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

    async def _fault(self, p: Planned, due: float) -> None:
        self.pace.on_time(due, p.event, p.at, f"group {p.target}")
        asyncio.get_running_loop().create_task(self._fault_for(self.proxies[p.target], p.event))

    async def _fault_for(self, proxy: FaultProxy, e: Event) -> None:
        assert e.for_s is not None  # noqa: S101  # validated
        FAULTS_ON[e.action](proxy, e)
        self.stats.events_applied += 1
        await asyncio.sleep(e.for_s)
        heal(proxy)

    async def _reboot(self, p: Planned, due: float) -> None:
        dev = self.devices[p.target]
        self.pace.on_time(due, p.event, p.at, p.target)
        # Not awaited: the agent's old connection closes while the timeline goes on.
        self._background(self.reboot(dev))
        self.stats.events_applied += 1

    async def _command(self, dev: SimDevice, p: Planned, due: float) -> None:
        self.pace.on_time(due, p.event, p.at, dev.device_id)  # issued now
        await send_command(self.cloud, dev, p.event)

    async def _local(self, p: Planned, due: float) -> None:
        dev, e = self.devices[p.target], p.event
        try:
            if e.action == "crash":
                await self._crash(dev, e)
            else:
                local_action(dev, e, time.time())
            self.stats.events_applied += 1
        except AgentError as exc:
            self.stats.events_refused[f"{e.action}:{type(exc).__name__}"] += 1
        self.pace.on_time(due, e, p.at, p.target)  # when it was done: a burst takes its time

    async def _crash(self, dev: SimDevice, e: Event) -> None:
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
