"""The simulated fleet: thousands of full agents in one process, driven by a scenario.

Every device is the same code as on a Pi: a ``Device`` over the encrypted
store (one shared SQLite file, one data key per device) and a ``Transport`` over
mutual TLS with its own certificate. The fleet builds its devices, connects them,
has its timeline played (``simulator.actions.Player``, on ``simulator.schedule``'s
plan), lets it settle (``simulator.settling``) and stops them; the devices' ground
truth (``DeviceTruth``) and the cloud hold what the checker needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from agent.core.identity import backend_id
from agent.device import CoreConfig, build_device
from agent.errors import AgentError
from agent.runtime import metrics
from agent.runtime.target import BrokerTarget
from agent.runtime.tls import client_context
from agent.runtime.transport import Transport
from agent.store.database import Database
from agent.store.keys import FileKeyStore
from simulator import settling
from simulator.acks import AckBatch
from simulator.actions import Player, command_results
from simulator.cloud import Cloud
from simulator.devices import OnRealTime, SimDevice, scenario_devices, shard_of
from simulator.faults import FaultProxy
from simulator.jetstream import JetStreamAt
from simulator.pki import DevPki
from simulator.sampling import FleetStats, Sampler, rss_kib
from simulator.scenario import Fault, Latency, Loss, Scenario
from simulator.schedule import plan
from simulator.truth import DeviceTruth

log = logging.getLogger("smartmi.sim")

STOP_WAIT_S = 10.0  # how long a stopped transport gets to finish
FIRMWARE: Final = "1.0.0"  # every device's firmware until a firmware-update
# CPython's cycle collector while a fleet runs (its default is 700, 10, 10).
RUNNING_GC_THRESHOLDS: Final = (20_000, 50, 1_000)


@dataclass(frozen=True, slots=True)
class FleetBroker:
    """The broker a fleet runs against: where its devices and its backend reach it, and
    what the simulator may do with it."""

    host: str
    port: int
    # Devices spread over these ports (a cluster's nodes); empty: all on ``port``.
    ports: Sequence[int] = ()
    protocol: Literal["v5", "v311"] = "v5"
    cloud_tls: ssl.SSLContext | None = None  # the backend's; None: from the dev PKI
    backend_persistent: bool = False
    jetstream: JetStreamAt | None = None  # where the backend reads the uplink, if there
    # Restarts it (a broker the simulator started); None: broker-restart is refused.
    restart: Callable[[], object] | None = None
    # Lets the fleet's device IDs in, where the broker lists its users (NATS).
    authorize: Callable[[list[str]], object] | None = None
    # It stores before it acknowledges (a JetStream cluster): a restart loses nothing.
    keeps_acknowledged: bool = False


@dataclass(frozen=True, slots=True)
class SharedStore:
    """What every device's agent runs on (from ``Fleet.build``): one SQLite file, one key
    store (a data key per device), and the batch their acknowledgements are written in."""

    db: Database
    keys: FileKeyStore
    acks: AckBatch


class Fleet:
    """Runs one scenario with ``devices`` simulated devices against one broker."""

    def __init__(
        self,
        scenario: Scenario,
        devices: int,
        *,
        workdir: Path,
        pki: DevPki,
        broker: FleetBroker,
        progress: bool = True,
        seed: int | None = None,
        grace_s: float | None = None,
        inject: Callable[[Fleet], Awaitable[None]] | None = None,
        shard: tuple[int, int] = (1, 1),
    ) -> None:
        self.scenario = scenario
        self.n = devices
        self.workdir = workdir
        self.pki = pki
        self.broker = broker
        self.ports = list(broker.ports) or [broker.port]
        # Shard K of N plays every Nth device of the scenario (K = 1..N), with backend
        # consumer K as its cloud when N > 1.
        self.shard = shard
        k, n_shards = shard
        backend = 0 if n_shards == 1 else k
        cloud_tls = broker.cloud_tls
        if cloud_tls is None and backend:
            ident = pki.backend_consumer(backend)
            cloud_tls = client_context(pki.ca_cert, ident.cert, ident.key)
        self.cloud = Cloud(
            broker.host,
            broker.port,
            pki,
            tls=cloud_tls,
            client_id=backend_id(backend),
            protocol=broker.protocol,
            persistent=broker.backend_persistent,
            fallback_ports=tuple(self.ports[1:]),
            jetstream=broker.jetstream,
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
        # One source of backoff jitter for every transport: a Random each is 2.5 KiB.
        self.jitter = random.Random(f"jitter-{self.seed}")  # noqa: S311
        self.devices: dict[str, SimDevice] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.stats = FleetStats()
        self.store: SharedStore | None = None  # from build()
        self._gc_before: tuple[int, int, int] | None = None  # thresholds while not running
        # Every device's status at the end, for a metrics file (--metrics); only when
        # asked, as it reads every device's store once more.
        self.keep_status = False
        self.final_status: list[metrics.Snapshot] = []
        self.was_interrupted = False  # stopped by Ctrl-C: the report says incomplete
        # When an observer capturing beside the backend had subscribed again after each
        # broker restart (``smartmi-sim run --capture``); empty without one.
        self.observer_back: list[float] = []

    # -- building ------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    async def build(self) -> SharedStore:
        """Issue certificates, open the store and make every device (not yet connected)."""
        ids = shard_of(scenario_devices(self.scenario, self.n), self.shard)
        self.cloud.devices = frozenset(d for _, d in ids) if self.shard[1] > 1 else None
        self._say(f"issuing {len(ids)} device certificates")
        idents = self.pki.ensure_devices([d for _, d in ids])
        if self.broker.authorize is not None:
            self.broker.authorize([d for _, d in ids])
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Like the database's synchronous=NORMAL: survives a process crash, not power loss.
        keys = FileKeyStore(self.workdir / "keys", durable=False)
        db = Database(self.workdir / "fleet.db", synchronous="NORMAL")
        store = self.store = SharedStore(db, keys, AckBatch(db, forgotten=self._forgotten_ack))
        host = self.broker.host
        for g in self.scenario.groups:
            if any(isinstance(e, Fault) for e in g.events):
                proxy = FaultProxy(host, self.broker.port, random.Random(self.rng.random()))  # noqa: S311
                await proxy.start()
                self.proxies[g.name] = proxy
        for k, (g, device_id) in enumerate(ids):
            ident = idents[device_id]
            ctx = client_context(self.pki.ca_cert, ident.cert, ident.key)
            via = self.proxies.get(g.name)
            grace = self.grace_s + max(
                [e.ms / 1000 for e in g.events if isinstance(e, Latency)]
                + [FaultProxy.RETRANSMIT_S for e in g.events if isinstance(e, Loss)]
                + [0.0]
            )
            truth = DeviceTruth(device_id, g.name, g.policy_version, grace_s=grace)
            # Spread over a cluster's nodes, each device with the others to fall back on.
            ports = self.ports[k % len(self.ports) :] + self.ports[: k % len(self.ports)]
            target = BrokerTarget(
                host,
                via.port if via else ports[0],
                ctx,
                protocol=self.broker.protocol,
                connect_timeout=30.0,
                fallbacks=() if via else tuple((host, p) for p in ports[1:]),
            )
            dev = SimDevice(device_id, g, None, None, truth, target)  # type: ignore[arg-type]
            self._power_on(dev, store)
            self.devices[device_id] = dev
        return store

    def _power_on(self, dev: SimDevice, store: SharedStore) -> None:
        """The device's agent starts: its store opens, a new transport (not yet running).
        It runs the firmware it ran before (a reboot is not an update)."""
        firmware = FIRMWARE if dev.core is None else dev.core.config.firmware_version
        dev.core = build_device(
            store.db,
            store.keys,
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
            rng=self.jitter,
            command_listener=command_results(dev, self.stats),
            ack_sink=store.acks.add,
        )

    def _forgotten_ack(self, transport: Transport, msg_id: str, now: float) -> None:
        """A PUBACK for an item its device had forgotten (a wipe drops what is in flight):
        the broker took it, so the ground truth keeps when it left all the same, rather
        than the checker falling back on its later arrival at the backend."""
        dev = self.devices.get(transport.device_id)
        if dev is not None and msg_id not in dev.truth.acked:
            dev.truth.acknowledged(msg_id, now - dev.clock_offset)

    async def _reboot(self, dev: SimDevice, store: SharedStore) -> None:
        """Power the agent off and on: the same store, a new process's memory."""
        if dev.task is not None:
            dev.transport.stop(dev.task)
            # Bounded: a transport stopped while its connection was being aborted under
            # load has been seen not to finish; the broker ends its session when the
            # new one connects with the same identity.
            done, _ = await asyncio.wait([dev.task], timeout=STOP_WAIT_S)
            if not done:
                self.stats.stuck_stops += 1
        self._power_on(dev, store)
        dev.task = asyncio.create_task(dev.transport.run(), name=dev.device_id)

    # -- running ---------------------------------------------------------------------------
    def _flush_counters(self) -> None:
        """Write the store's rollback counters advanced since the last time (the fleet's
        key store keeps them in memory between flushes)."""
        if self.store is None:
            return
        try:
            self.store.keys.flush()
        except AgentError as exc:  # they lag, which is never a false alarm: try again later
            log.warning("rollback counters not written", extra={"error": str(exc)})

    async def run(self) -> None:
        """Build, connect, play the timeline, drain; the truths and cloud hold the results."""
        self.stats.rss_baseline_kib = rss_kib()
        self.stats.started_at = time.time()
        say = self._say if self.progress else None
        sampler = Sampler(self.devices, self.cloud, self.stats, say=say, flush=self._flush_counters)
        sampling = asyncio.create_task(sampler.run(), name="sampler")
        try:
            store = await self.build()
            async with self.cloud.connected():
                sampler.phase = "connecting"
                start = time.monotonic()
                self.start()
                sweeper = asyncio.create_task(self._sweep_retention(), name="retention")
                await asyncio.gather(*(d.transport.connected.wait() for d in self.devices.values()))
                self.stats.connect_s = time.monotonic() - start
                self.stats.connected = len(self.devices)
                self.stats.rss_fleet_kib = rss_kib()
                self._say(f"{len(self.devices)} devices connected in {self.stats.connect_s:.1f} s")
                sampler.phase = "scenario"
                player = Player(
                    self.devices,
                    self.proxies,
                    self.cloud,
                    self.stats,
                    restart_broker=self.broker.restart,
                    reboot=lambda dev: self._reboot(dev, store),
                )
                planned = plan(self.scenario, self.devices.values(), self.rng)
                await player.play(planned, self.scenario.duration_s)
                if self.inject is not None:
                    await self.inject(self)
                sampler.phase = "draining"
                self.stats.drained = await settling.drain(
                    self.devices.values(), self.cloud, self.scenario.settle_s, self._windows
                )
                settling.note_pending(self.devices.values())
                sweeper.cancel()
                await self.stop()
        finally:
            # Whatever ended the run, the transports stop for good: a cancellation alone
            # may come back as an MQTT error and leave them reconnecting.
            await self.stop()
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            for proxy in self.proxies.values():
                await proxy.close()
            if self.keep_status:
                self.final_status = [
                    metrics.Snapshot(d.core.status(), d.transport.status())
                    for d in self.devices.values()
                ]
            if self.store is not None:
                self.store.db.close()
            self.stats.elapsed_s = time.time() - self.stats.started_at

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
        settling.stopped_early(self.devices.values())

    def outages(self) -> list[tuple[float, float]]:
        """From each broker restart until the backend (and an observer beside it) had
        subscribed again: what the broker acknowledged before the end of such a window
        may have been lost with it (the broker's custody, not the device's)."""
        return settling.outages(
            self.stats.broker_restarts, self.cloud.online_at, self.observer_back
        )

    def _windows(self) -> list[tuple[float, float]]:
        """The windows in which the broker may have lost what it acknowledged: a broker
        that stores before it acknowledges (a JetStream cluster) owes every acknowledged
        item, however late; of Mosquitto's, those of a restart's window may be lost."""
        return [] if self.broker.keeps_acknowledged else self.outages()

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
