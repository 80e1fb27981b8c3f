"""The simulated fleet: thousands of full agents in one process, driven by a scenario.

Every device is the same code as on a Pi: a ``Device`` over the encrypted
store (one shared SQLite file, one data key per device) and a ``Transport`` over
mutual TLS with its own certificate. The fleet carries out the scenario's
timeline, records the ground truth the checker needs (``DeviceTruth``), and
collects what the backend received.

Past 400 lines on purpose: building the devices, playing the timeline and draining
share the fleet's devices, proxies and counters; one class keeps that state whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from agent.core.identity import backend_id
from agent.core.location import Precision
from agent.core.purposes import Purpose, parse_rfc3339, rfc3339
from agent.device import CoreConfig, Device
from agent.errors import AgentError, CommandRejected
from agent.runtime import metrics
from agent.runtime.target import BrokerTarget
from agent.runtime.tls import client_context
from agent.runtime.transport import Transport
from agent.store.database import Database
from agent.store.keys import FileKeyStore
from agent.store.records import DeviceStore
from simulator.acks import AckBatch
from simulator.broker import memory_kib
from simulator.cloud import Cloud
from simulator.devices import OnRealTime, SimDevice, crash_report, scenario_devices, shard_of
from simulator.faults import FaultProxy
from simulator.jetstream import JetStreamAt
from simulator.pki import DevPki
from simulator.scenario import FAULTS, Event, Scenario
from simulator.truth import DeviceTruth

log = logging.getLogger("smartmi.sim")


def rss_kib() -> int:
    """This process's resident memory (KiB), from /proc; 0 where unavailable."""
    return memory_kib()


STOP_WAIT_S = 10.0  # how long a stopped transport gets to finish
FIRMWARE: Final = "1.0.0"  # every device's firmware until a firmware-update
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
# CPython's cycle collector while a fleet runs (its default is 700, 10, 10).
RUNNING_GC_THRESHOLDS: Final = (20_000, 50, 1_000)


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


class Fleet:
    """Runs one scenario with ``devices`` simulated devices against one broker."""

    def __init__(
        self,
        scenario: Scenario,
        devices: int,
        *,
        workdir: Path,
        pki: DevPki,
        broker_host: str,
        broker_port: int,
        restart_broker: Callable[[], object] | None = None,
        cloud_tls: ssl.SSLContext | None = None,
        progress: bool = True,
        seed: int | None = None,
        grace_s: float | None = None,
        inject: Callable[[Fleet], Awaitable[None]] | None = None,
        protocol: Literal["v5", "v311"] = "v5",
        ports: Sequence[int] = (),
        backend_persistent: bool = False,
        jetstream: JetStreamAt | None = None,
        authorize: Callable[[list[str]], object] | None = None,
        shard: tuple[int, int] = (1, 1),
        broker_keeps_acknowledged: bool = False,
    ) -> None:
        self.scenario = scenario
        self.n = devices
        self.workdir = workdir
        self.pki = pki
        self.host, self.port = broker_host, broker_port
        # Devices spread over these ports (a cluster's nodes); else all on ``port``.
        self.ports = list(ports) or [broker_port]
        self.protocol = protocol
        # Lets the fleet's device IDs in, where the broker lists its users (NATS).
        self.authorize = authorize
        self.restart_broker = restart_broker
        # Shard K of N plays every Nth device of the scenario (K = 1..N), with backend
        # consumer K as its cloud when N > 1.
        self.shard = shard
        self.broker_keeps_acknowledged = broker_keeps_acknowledged
        k, n_shards = shard
        backend = 0 if n_shards == 1 else k
        if cloud_tls is None and backend:
            ident = pki.backend_consumer(backend)
            cloud_tls = client_context(pki.ca_cert, ident.cert, ident.key)
        self.cloud = Cloud(
            broker_host,
            broker_port,
            pki,
            tls=cloud_tls,
            client_id=backend_id(backend),
            protocol=protocol,
            persistent=backend_persistent,
            fallback_ports=tuple(self.ports[1:]),
            jetstream=jetstream,
        )
        self.progress = progress
        # Runs after the timeline, before the drain: the checker's self-test breaks
        # promises here on purpose.
        self.inject = inject
        self.seed = scenario.seed if seed is None else seed
        # How late a choice may reach a device, or a message on the wire the broker,
        # on the path's own delay (faults add theirs); stated in the report.
        self.grace_s = scenario.grace_s if grace_s is None else grace_s
        self.rng = random.Random(self.seed)  # noqa: S311  # simulation, not cryptography
        self.devices: dict[str, SimDevice] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.stats = FleetStats()
        self.db: Database | None = None
        self._keys: FileKeyStore | None = None  # the devices' keys, from build()
        self._gc_before: tuple[int, int, int] | None = None  # thresholds while not running
        # Every device's status at the end, for a metrics file (--metrics); only when
        # asked, as it reads every device's store once more.
        self.keep_status = False
        self.final_status: list[metrics.Snapshot] = []
        self._t0 = 0.0
        self._held_since = 0.0  # when the timeline last let other tasks run
        self._events_total = 0
        self._events_played = 0  # played so far, applied or refused (the progress line)
        self.was_interrupted = False  # stopped by Ctrl-C: the report says incomplete
        self._sending: set[asyncio.Task[None]] = set()
        self._restarting: asyncio.Task[None] | None = None  # the latest broker restart
        # When an observer capturing beside the backend had subscribed again after each
        # broker restart (``smartmi-sim run --capture``); empty without one.
        self.observer_back: list[float] = []

    # -- building ------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    async def build(self) -> None:
        """Issue certificates, open the store and make every device (not yet connected)."""
        ids = shard_of(scenario_devices(self.scenario, self.n), self.shard)
        self.cloud.devices = frozenset(d for _, d in ids) if self.shard[1] > 1 else None
        self._say(f"issuing {len(ids)} device certificates")
        idents = self.pki.ensure_devices([d for _, d in ids])
        if self.authorize is not None:
            self.authorize([d for _, d in ids])
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = Database(self.workdir / "fleet.db", synchronous="NORMAL")
        # Like the database's synchronous=NORMAL: survives a process crash, not power loss.
        keys = self._keys = FileKeyStore(self.workdir / "keys", durable=False)
        self._acks = AckBatch(self.db, forgotten=self._forgotten_ack)
        for g in self.scenario.groups:
            if any(e.action in FAULTS for e in g.events):
                proxy = FaultProxy(self.host, self.port, random.Random(self.rng.random()))  # noqa: S311
                await proxy.start()
                self.proxies[g.name] = proxy
        for k, (g, device_id) in enumerate(ids):
            ident = idents[device_id]
            ctx = client_context(self.pki.ca_cert, ident.cert, ident.key)
            via = self.proxies.get(g.name)
            grace = self.grace_s + max(
                [(e.ms or 0) / 1000 for e in g.events if e.action == "latency"]
                + [FaultProxy.RETRANSMIT_S for e in g.events if e.action == "loss"]
                + [0.0]
            )
            truth = DeviceTruth(device_id, g.name, g.policy_version, grace_s=grace)
            dev = SimDevice(device_id, g, None, None, truth)  # type: ignore[arg-type]
            # Spread over a cluster's nodes, each device with the others to fall back on.
            ports = self.ports[k % len(self.ports) :] + self.ports[: k % len(self.ports)]
            dev.target = BrokerTarget(
                self.host,
                via.port if via else ports[0],
                ctx,
                protocol=self.protocol,
                connect_timeout=30.0,
                fallbacks=() if via else tuple((self.host, p) for p in ports[1:]),
            )
            self._power_on(dev, keys)
            self.devices[device_id] = dev

    def _power_on(self, dev: SimDevice, keys: FileKeyStore) -> None:
        """The device's agent starts: its store opens, a new transport (not yet running).
        It runs the firmware it ran before (a reboot is not an update)."""
        assert self.db is not None and dev.target is not None  # noqa: S101, PT018  # built
        firmware = FIRMWARE if dev.core is None else dev.core.config.firmware_version
        store = DeviceStore(self.db, dev.device_id, keys)
        dev.core = Device(
            store,
            CoreConfig(
                device_id=dev.device_id,
                serial=f"SN-{dev.device_id}",
                model="smartmi.fan.sim",
                firmware_version=firmware,
                policy_version=dev.truth.policy_version,
                outbox_cap=self.scenario.outbox_cap,
            ),
            now=dev.now(),
        )
        dev.core.watch(OnRealTime(dev))
        dev.transport = Transport(
            dev.core,
            dev.target,
            clock=dev.now,
            rng=random.Random(self.rng.random()),  # noqa: S311
            command_listener=self._on_command(dev),
            ack_sink=self._acks.add,
        )

    def _forgotten_ack(self, transport: Transport, msg_id: str, now: float) -> None:
        """A PUBACK for an item its device had forgotten (a wipe drops what is in flight):
        the broker took it, so the ground truth keeps when it left all the same, rather
        than the checker falling back on its later arrival at the backend."""
        dev = self.devices.get(transport.device_id)
        if dev is not None and msg_id not in dev.truth.acked:
            dev.truth.acknowledged(msg_id, now - dev.clock_offset)

    async def _reboot(self, dev: SimDevice) -> None:
        """Power the agent off and on: the same store, a new process's memory."""
        if dev.task is not None:
            dev.transport.stop(dev.task)
            # Bounded: a transport stopped while its connection was being aborted under
            # load has been seen not to finish; the broker ends its session when the
            # new one connects with the same identity.
            done, _ = await asyncio.wait([dev.task], timeout=STOP_WAIT_S)
            if not done:
                self.stats.stuck_stops += 1
        assert self._keys is not None  # noqa: S101  # built
        self._power_on(dev, self._keys)
        dev.task = asyncio.create_task(dev.transport.run(), name=dev.device_id)

    def _on_command(self, dev: SimDevice) -> Callable[[str, Any, float], None]:
        """Count what a cloud command did on the device (the truth was logged when the
        cloud issued it, see ``_cloud_event``)."""

        def listener(name: str, result: dict[str, Any] | CommandRejected, now: float) -> None:
            if dev.issued and name != "sync":
                issued = dev.issued.pop(0)
                if issued is not None:
                    self.stats.command_delays_s.append(time.time() - issued)
            if isinstance(result, CommandRejected):
                self.stats.events_refused[f"{name}:{result.reason}"] += 1
            elif any(v == "applied" for v in result.values()):
                self.stats.events_applied += 1
            else:
                self.stats.events_refused[f"{name}:ignored"] += 1

        return listener

    # -- the timeline ----------------------------------------------------------------
    def _schedule(self) -> list[tuple[float, int, str | None, Event]]:
        plan: list[tuple[float, int, str | None, Event]] = []
        order = 0
        for g in self.scenario.groups:
            members = [d for d in self.devices.values() if d.group is g]
            for e in g.events:
                if e.action == "broker-restart" or e.action in FAULTS:
                    plan.append((e.at, order, g.name if e.action in FAULTS else None, e))
                    order += 1
                    continue
                for d in members:
                    t = e.at + (self.rng.uniform(0, e.jitter_s) if e.jitter_s else 0.0)
                    plan.append((t, order, d.device_id, e))
                    order += 1
        plan.sort(key=lambda p: (p[0], p[1]))
        return plan

    async def _apply(self, target: str | None, e: Event, at: float, due: float) -> None:
        """Carry out event ``e`` (for device or group ``target``), scheduled at ``at``
        seconds into the timeline, which is monotonic time ``due``."""
        if e.action == "broker-restart":
            self._on_time(due, e, at, "the broker")
            if self.restart_broker is None:
                self.stats.events_refused["broker-restart:external-broker"] += 1
                return
            # Beside the timeline: the users' choices do not wait for the broker to come
            # back (a restart took 0.3 s and more, and every event after it was as late).
            before = self._restarting
            self._restarting = self._background(self._restart(self.restart_broker, before))
            return
        assert target is not None  # noqa: S101  # a group (faults) or a device
        if e.action in FAULTS:
            self._on_time(due, e, at, f"group {target}")
            asyncio.get_running_loop().create_task(self._fault(self.proxies[target], e))
            return
        dev = self.devices[target]
        if e.action == "reboot":
            self._on_time(due, e, at, target)
            # Not awaited: the agent's old connection closes while the timeline goes on.
            self._background(self._reboot(dev))
            self.stats.events_applied += 1
            return
        if e.source == "cloud":
            # Sent, not awaited: the cloud does not wait for one device before the next.
            self._background(self._cloud_event(dev, e, at, due))
            return
        try:
            if e.action == "crash":
                await self._crash(dev, e)
            else:
                self._local_event(dev, e, time.time())
            self.stats.events_applied += 1
        except AgentError as exc:
            self.stats.events_refused[f"{e.action}:{type(exc).__name__}"] += 1
        self._on_time(due, e, at, target)  # when it was done: a burst takes its time

    async def _crash(self, dev: SimDevice, e: Event) -> None:
        """``e.count`` crashes captured one after another, each at the device's time, and
        the loop let go between them (``_breathe``)."""
        for k in range(e.count):
            await self._breathe()
            dev.core.capture_crash(crash_report(e.text, k), now=dev.now())

    async def _breathe(self) -> None:
        """Let the other tasks run once the timeline has held the loop for HOLD_S."""
        if time.monotonic() - self._held_since >= HOLD_S:
            await asyncio.sleep(0)
            self._held_since = time.monotonic()

    def _on_time(self, due: float, e: Event, at: float, who: str) -> None:
        """Note how late an event scheduled for monotonic time ``due`` was carried out."""
        lag = max(0.0, time.monotonic() - due)
        self.stats.event_lags_s.append(lag)
        if lag > self.stats.max_lag_s:
            self.stats.max_lag_s = lag
            self.stats.latest = f"{e.action} at {at:.2f} s for {who}"

    async def _restart(
        self, restart: Callable[[], object], before: asyncio.Task[None] | None
    ) -> None:
        """Restart the broker, after the restart before this one has finished."""
        if before is not None:
            await before
        self.stats.broker_restarts.append(time.time())
        await asyncio.to_thread(restart)
        self.stats.events_applied += 1

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` beside the timeline; the run waits for all of it before draining."""
        task = asyncio.create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return task

    async def _fault(self, proxy: FaultProxy, e: Event) -> None:
        assert e.for_s is not None  # noqa: S101  # validated
        if e.action == "partition":
            proxy.partition(True)
        elif e.action == "latency":
            proxy.latency_s = (e.ms or 0) / 1000
        else:
            proxy.loss = e.rate or 0.0
        self.stats.events_applied += 1
        await asyncio.sleep(e.for_s)
        proxy.partition(False)
        proxy.latency_s, proxy.loss = 0.0, 0.0

    def _local_event(self, dev: SimDevice, e: Event, real: float) -> None:  # one branch per action
        """A local action: the device acts at its own clock, the truth is real time."""
        core, truth = dev.core, dev.truth
        now = real + dev.clock_offset
        if e.action == "bind":
            dev.binds += 1
            core.bind(f"{dev.device_id}-b{dev.binds}", now=now, minor=e.minor)
            truth.log(real, "bind", minor=e.minor)
        elif e.action == "grant":
            core.grant(Purpose(str(e.purpose)), now=now)
            truth.log(real, "grant", purpose=e.purpose)
        elif e.action == "withdraw":
            core.withdraw(Purpose(str(e.purpose)), now=now)
            truth.log(real, "withdraw", purpose=e.purpose)
        elif e.action == "policy-version":
            assert e.version is not None  # noqa: S101
            truth.log(real, "policy-version", version=e.version)
            core.set_policy_version(e.version, now=now)
        elif e.action == "location":
            assert e.lat is not None and e.lon is not None  # noqa: S101, PT018
            core.set_location(e.lat, e.lon, now=now)
        elif e.action == "precision":
            core.set_precision(Precision(str(e.level)), now=now)
            truth.log(real, "precision", level=e.level)
        elif e.action == "firmware-update":
            assert e.version is not None  # noqa: S101
            core.firmware_updated(e.version, now=now)
        elif e.action == "clock":
            assert e.shift_s is not None  # noqa: S101
            dev.clock_offset += e.shift_s
            truth.log(real, "clock", offset_s=dev.clock_offset)
            core.sweep_retention(now=dev.now())  # the device's timer runs on its clock
        elif e.action in ("unbind", "factory-reset", "account-cancelled"):
            wipe = {
                "unbind": core.unbind,
                "factory-reset": core.factory_reset,
                "account-cancelled": core.account_cancelled,
            }[e.action]
            truth.log(real, "wipe", reason=e.action)
            wipe(now=now)
        else:  # the scenario's validation keeps every other action from getting here
            raise CommandRejected("not-a-local-action", e.action)

    async def _cloud_event(self, dev: SimDevice, e: Event, at: float, due: float) -> None:
        """Issue a cloud command; the ground truth is the user's choice at its issue time,
        with the command's ID (an observer on ``down/`` sees when the broker forwarded it,
        and the checker measures the command's path delay from there)."""
        self._on_time(due, e, at, dev.device_id)  # issued now
        core, truth = dev.core, dev.truth
        issued = parse_rfc3339(rfc3339(time.time()))  # as the command carries it
        binding = {
            "binding_id": core.settings.binding_id or "not-bound",
            "issued_at": rfc3339(issued),
        }
        if e.action == "replay":
            # Not the user's choice: the cloud's latest command to the device, again.
            last = next((c for c in reversed(self.cloud.issued) if c[0] == dev.device_id), None)
            if last is not None:
                dev.issued.append(None)
                await self.cloud.send_raw(dev.device_id, last[1], json.dumps(last[2]).encode())
            return
        name: str
        what: str
        body: dict[str, Any]
        info: dict[str, Any]
        if e.action in ("grant", "withdraw"):
            name, what, info = "consent", e.action, {"purpose": e.purpose}
            body = {
                **binding,
                "purposes": {e.purpose: e.action == "grant"},
                "policy_version": core.config.policy_version,
            }
        elif e.action == "precision":
            name, what, info = "location-precision", "precision", {"level": e.level}
            body = {**binding, "precision": e.level}
        elif e.action in ("unbind", "account-cancelled"):
            name, what, info, body = e.action, "wipe", {"reason": e.action}, binding
        elif e.action in ("suspend", "resume"):
            name, what, info = f"{e.action}-collection", e.action, {}
            body = {"issued_at": rfc3339(issued)}
        else:
            raise CommandRejected("not-a-cloud-command", e.action)
        dev.issued.append(issued)
        command_id, sending = self.cloud.issue(dev.device_id, name, body)
        truth.log(issued, what, **info, via="cloud", command_id=command_id)
        await sending

    # -- running ---------------------------------------------------------------------------
    def _report_progress(self, phase: str, up: int) -> None:
        queued = sum(d.core.queued_count() for d in self.devices.values())
        self._say(
            f"[{time.time() - self._t0:6.1f}s] {phase:<9} connected {up}/{len(self.devices)}"
            f"  events {self._events_played}/{self._events_total}"
            f"  queued {queued}  received {len(self.cloud.received)}"
        )

    def _note_pending(self) -> None:
        """What each device still holds at the end: never lost, never sent."""
        for dev in self.devices.values():
            dev.core.reap_all()  # shredded items: the ground truth hears of each
            requests = dev.core.store.deletion_requests()
            dev.truth.deletion_requests_pending = len(requests)
            dev.truth.pending_at_end = set(dev.core.store.msg_ids()) | {r.msg_id for r in requests}

    async def _sample(self, phase: list[str], interval: float = 1.0) -> None:
        """The fleet's state once a second, for the HTML report's charts, and the
        progress line from the same figures; the key store's rollback counters are
        written on the same tick."""
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
            if self.progress:
                self._report_progress(phase[0], up)
            self._flush_counters()
            await asyncio.sleep(interval)

    def _flush_counters(self) -> None:
        """Write the store's rollback counters advanced since the last time (the fleet's
        key store keeps them in memory between flushes)."""
        if self._keys is None:
            return
        try:
            self._keys.flush()
        except AgentError as exc:  # they lag, which is never a false alarm: try again later
            log.warning("rollback counters not written", extra={"error": str(exc)})

    async def run(self) -> None:
        """Build, connect, play the timeline, drain; the truths and cloud hold the results."""
        self.stats.rss_baseline_kib = rss_kib()
        self._t0 = self.stats.started_at = time.time()
        phase = ["building"]
        sampler = asyncio.create_task(self._sample(phase), name="sampler")
        try:
            await self.build()
            async with self.cloud.connected():
                phase[0] = "connecting"
                start = time.monotonic()
                self.start()
                sweeper = asyncio.create_task(self._sweep_retention(), name="retention")
                await asyncio.gather(*(d.transport.connected.wait() for d in self.devices.values()))
                self.stats.connect_s = time.monotonic() - start
                self.stats.connected = len(self.devices)
                self.stats.rss_fleet_kib = rss_kib()
                self._say(f"{len(self.devices)} devices connected in {self.stats.connect_s:.1f} s")
                phase[0] = "scenario"
                plan = self._schedule()
                self._events_total = len(plan)
                t0 = self._held_since = time.monotonic()
                for at, _order, target, event in plan:
                    delay = t0 + at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                        self._held_since = time.monotonic()
                    else:
                        await self._breathe()  # behind: still let the devices run
                    await self._apply(target, event, at, t0 + at)
                    self._events_played += 1
                await asyncio.sleep(max(0.0, t0 + self.scenario.duration_s - time.monotonic()))
                await asyncio.gather(*self._sending)
                if self.inject is not None:
                    await self.inject(self)
                phase[0] = "draining"
                self.stats.drained = await self._drain()
                self._note_pending()
                sweeper.cancel()
                await self.stop()
        finally:
            # Whatever ended the run, the transports stop for good: a cancellation alone
            # may come back as an MQTT error and leave them reconnecting.
            await self.stop()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            for proxy in self.proxies.values():
                await proxy.close()
            if self.keep_status:
                self.final_status = [
                    metrics.Snapshot(d.core.status(), d.transport.status())
                    for d in self.devices.values()
                ]
            if self.db is not None:
                self.db.close()
            self.stats.elapsed_s = time.time() - self._t0

    async def _sweep_retention(self, interval: float = 10.0) -> None:
        """Every device's retention timer (P7), connected or not, on its own clock."""
        while True:
            await asyncio.sleep(interval)
            for dev in self.devices.values():
                dev.core.sweep_retention(now=dev.now())

    def interrupted(self) -> None:
        """The run was stopped early (Ctrl-C): nothing it still held counts as lost, and
        no wipe as missing its deletion request; what arrived is judged as usual. Stopped
        while connecting, the report gives how many had connected and the memory then."""
        self.was_interrupted = True
        if self.stats.connect_s is None:  # stopped before every device had connected
            self.stats.connected = self.stats.samples[-1][1] if self.stats.samples else 0
            self.stats.rss_fleet_kib = rss_kib()
        for dev in self.devices.values():
            truth = dev.truth
            truth.pending_at_end |= set(truth.queued_items) - truth.dropped_items
            truth.deletion_requests_pending = max(
                truth.deletion_requests_pending,
                sum(1 for _at, what, _info in truth.events if what == "wipe"),
            )

    def outages(self) -> list[tuple[float, float]]:
        """From each broker restart until the backend had subscribed again: what the broker
        acknowledged before the end of such a window may have been lost with it (the
        broker's custody, not the device's)."""
        return [
            (
                t,
                max(
                    min((o for o in online if o > t), default=float("inf"))
                    for online in (self.cloud.online_at, self.observer_back or [t])
                ),
            )
            for t in self.stats.broker_restarts
        ]

    async def _drain(self) -> bool:
        """Wait until every device is idle and the backend has every acknowledged item."""
        deadline = time.monotonic() + self.scenario.settle_s
        arrived: set[str | None] = set()
        counted = 0
        while time.monotonic() < deadline:
            received = self.cloud.received
            arrived.update(r.msg_id for r in received[counted:])
            counted = len(received)
            # Idle, and every cloud command taken: one still on its way may yet wipe
            # a device and make a deletion request.
            idle = all(
                d.transport.idle.is_set() and d.transport.connected.is_set() and not d.issued
                for d in self.devices.values()
            )
            # A broker that stores before it acknowledges (a JetStream cluster) owes every
            # acknowledged item, however late; of Mosquitto's, those of a restart's
            # window may be lost with it.
            windows = [] if self.broker_keeps_acknowledged else self.outages()
            if idle and all(
                m in arrived or any(t < end for _start, end in windows)
                for d in self.devices.values()
                for m, t in d.truth.acked.items()
            ):
                return True
            await asyncio.sleep(0.5)
        return False

    def start(self) -> None:
        """Start every device's transport."""
        if self._gc_before is None:
            # Thousands of agents keep millions of objects alive for the whole run, and
            # the cycle collector walked them again and again while connections added
            # more: at 10,000 agents, half of the event loop's CPU in a start. What is
            # built so far is frozen out of its reach, and it runs less often; reference
            # counting still frees at once whatever is not in a cycle.
            self._gc_before = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(*RUNNING_GC_THRESHOLDS)
        for dev in self.devices.values():
            dev.task = asyncio.create_task(dev.transport.run(), name=dev.device_id)

    async def stop(self) -> None:
        """Stop every device's transport and wait until each has stopped."""
        for dev in self.devices.values():
            if dev.task is not None:
                dev.transport.stop(dev.task)
        tasks = [dev.task for dev in self.devices.values() if dev.task is not None]
        if tasks:
            _done, stuck = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            self.stats.stuck_stops += len(stuck)
        for dev in self.devices.values():
            dev.task = None
        self._flush_counters()
        if self._gc_before is not None:
            gc.unfreeze()
            gc.set_threshold(*self._gc_before)
            self._gc_before = None
