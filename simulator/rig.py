"""One full agent over its own state directory (a real store, device and transport
against a real broker) that can be stopped and rebooted: for end-to-end tests and
the benchmark that kills agents."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.device import CoreConfig, CrashReport, Device, build_device
from agent.runtime.target import BrokerTarget
from agent.runtime.tls import client_context
from agent.runtime.transport import Transport
from agent.store.database import Database
from agent.store.keys import FileKeyStore
from simulator.broker import LocalBroker
from simulator.cloud import Cloud
from simulator.pki import DevPki

CONNECT_TIMEOUT = 20.0


@dataclass
class Agent:
    """One device agent whose store survives ``reboot``."""

    root: Path
    device_id: str
    broker: LocalBroker
    pki: DevPki
    policy_version: str = "1"
    firmware: str = "1.0.0"
    protocol: str | None = None  # the broker's
    node: int = 0  # which of a cluster's nodes to connect to
    ca: Path | None = None
    cert_for: str | None = None  # present another device's certificate
    ids: itertools.count[int] = field(default_factory=itertools.count)
    db: Database | None = None
    core: Device | None = None
    transport: Transport | None = None
    task: asyncio.Task[None] | None = None
    commands: asyncio.Queue[tuple[str, object]] = field(default_factory=asyncio.Queue)

    def open(self) -> Device:
        """Open (or reopen, as after a reboot) the device's store and core."""
        self.db = Database(self.root / "state.db", synchronous="NORMAL")
        config = CoreConfig(
            device_id=self.device_id,
            serial="SN-" + self.device_id,
            model="smartmi.fan.test",
            firmware_version=self.firmware,
            policy_version=self.policy_version,
        )
        prefix = f"{self.device_id}-{int(time.time() * 1000)}-"
        self.core = build_device(
            self.db,
            FileKeyStore(self.root / "keys"),
            config,
            now=time.time(),
            crash_dirs=[self.root / "crash"],
            new_id=lambda: f"{prefix}{next(self.ids)}",
        )
        return self.core

    def _started(self) -> Transport:
        if self.transport is None:
            raise RuntimeError(f"agent {self.device_id} is not started")
        return self.transport

    def start(self) -> Transport:
        """Start the transport (the core must be open)."""
        if self.core is None:
            raise RuntimeError(f"agent {self.device_id} is not open")
        cn = self.cert_for or self.device_id
        ident = self.pki.ensure_devices([cn])[cn]
        ctx = client_context(self.ca or self.pki.ca_cert, ident.cert, ident.key)
        protocol = self.protocol or self.broker.protocol
        self.broker.authorize([cn])
        ports = self.broker.ports
        ports = ports[self.node % len(ports) :] + ports[: self.node % len(ports)]
        target = BrokerTarget(
            self.broker.host,
            ports[0],
            ctx,
            fallbacks=tuple((self.broker.host, p) for p in ports[1:]),
            protocol="v5" if protocol == "v5" else "v311",
            connect_timeout=5.0,
        )
        self.transport = Transport(
            self.core,
            target,
            command_listener=lambda name, result, _now: self.commands.put_nowait((name, result)),
        )
        self.task = asyncio.create_task(self.transport.run(), name=f"agent:{self.device_id}")
        return self.transport

    async def connected(self) -> None:
        """Wait until the transport is connected."""
        await asyncio.wait_for(self._started().connected.wait(), CONNECT_TIMEOUT)

    async def synced(self) -> None:
        """Wait until the cloud answered this connection's command sync."""
        await asyncio.wait_for(self._started().synced.wait(), CONNECT_TIMEOUT)

    async def next_command(self) -> tuple[str, object]:
        """The next command outcome (a result dict or a CommandRejected)."""
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await self.commands.get()

    async def stop(self) -> None:
        """Stop the transport and close the store (the device powers off)."""
        if self.task is not None:
            self._started().stop(self.task)
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.db is not None:
            self.db.close()
            self.db = None
        self.core = None
        self.transport = None

    async def reboot(self) -> Device:
        """Power off and on again: the same state directory, a new process's memory."""
        await self.stop()
        core = self.open()
        self.start()
        return core

    async def idle(self) -> None:
        """Wait until the transport has nothing in flight and nothing sendable."""
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self._started().idle.wait()


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    """Open, start and connect an agent; stop it at the end."""
    agent.open()
    agent.start()
    try:
        await agent.connected()
        yield agent
    finally:
        await agent.stop()


async def until(cloud: Cloud, predicate: Callable[[], bool], within: float = 20.0) -> None:
    """Wait, bounded, until ``predicate()`` holds for what the cloud received."""
    async with asyncio.timeout(within):
        await cloud.wait_for(lambda _received: predicate())


def kinds(cloud: Cloud, agent: Agent) -> list[str]:
    """The kinds of what the cloud received from ``agent``, in order of arrival."""
    return [m.kind for m in cloud.of(agent.device_id)]


def crash(n: int = 0) -> CrashReport:
    """A crash report as a collector would make it."""
    return CrashReport(
        signature=f"SIGSEGV in fan_ctl #{n}",
        stack=f'Traceback (most recent call last):\n  File "/home/alice/fan.py", line {n}, in spin',
        ip_addresses=("192.168.1.20",),
        default_gateway="192.168.1.1",
        uptime_s=12.0,
    )
