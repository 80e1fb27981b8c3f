"""The MQTT transport: mutual TLS, QoS 1 hand-off of the outbox, cloud commands, reconnects.

``agent.runtime.mqtt`` (aiomqtt over paho-mqtt) runs the connection: paho's own TLS
socket on our event loop, so a connection costs no asyncio SSL transport buffers.
The transport carries out what the device decides and nothing more:

* an item leaves only when ``Device.next_batch`` hands it over (P1), and is
  acknowledged to the core only on a successful PUBACK (MQTT v5 §3.4.2.1: a reason
  code of 0x80 or above is a refusal, reported and retried later, never a success);
* a withdrawal or wipe takes back every PUBLISH that paho still holds and has not
  started to write (P2, P9); a packet already on the wire has left the device;
* a lost connection sends every in-flight item back to the outbox with the same
  ``msg_id`` (at-least-once; the cloud de-duplicates by ``msg_id``);
* reconnects follow the jittered schedules of ``agent.core.backoff``; certificate
  problems use the slow one and are reported with their kind.

Each connection uses a fresh paho client with a persistent session on the broker
(clean start off, a session expiry on v5), so commands sent while the device was
offline arrive, while unacknowledged PUBLISHes are re-sent from our outbox rather
than from paho's memory of an earlier connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agent.core import backoff, commands
from agent.core.identity import down_filter, up_topic
from agent.core.items import DropReason
from agent.core.purposes import Purpose
from agent.device import Device
from agent.errors import (
    AgentError,
    CertificateProblem,
    CommandRejected,
    PublishRefused,
    TransportError,
)
from agent.runtime import mqtt
from agent.runtime.commands import apply

log = logging.getLogger("smartmi.transport")

SESSION_EXPIRY_S = 7 * 24 * 3600  # keep commands queued for a device offline up to a week
HOUSEKEEPING_S = 600.0  # retention purges run at least this often while idle (P7)


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """Where and how to connect."""

    host: str
    port: int
    tls: ssl.SSLContext
    protocol: Literal["v5", "v311"] = "v5"
    keepalive: int = 60
    connect_timeout: float = 15.0


@dataclass(slots=True)
class TransportStats:
    """Counters for status output and the simulator's report (no personal values)."""

    attempts: int = 0
    connects: int = 0
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    recalled: int = 0
    commands_applied: int = 0
    commands_rejected: int = 0
    first_connected_at: float | None = None
    last_error: str | None = None
    last_error_kind: str | None = None


# (command name, its result or why it was refused, the time the device acted)
CommandListener = Callable[[str, "dict[str, Any] | CommandRejected", float], None]
# Records one acknowledgement: (transport, msg_id, time); the default is ``record_ack``.
AckSink = Callable[["Transport", str, float], None]


class Transport:
    """One device's connection to the broker, for as long as ``run`` runs."""

    def __init__(
        self,
        device: Device,
        target: BrokerTarget,
        *,
        window: int = 20,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        command_listener: CommandListener | None = None,
        guard: commands.ReplayGuard | None = None,
        ack_sink: AckSink | None = None,
    ) -> None:
        self.device = device
        self.target = target
        self.window = window
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self.command_listener = command_listener
        self.guard = guard or commands.ReplayGuard()
        self.ack_sink = ack_sink
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        # Set while connected with nothing in flight and nothing sendable right now.
        self.idle = asyncio.Event()
        # Set on every failed connection or refused PUBLISH; callers clear it.
        self.trouble = asyncio.Event()
        self._wake = asyncio.Event()
        self._conn: mqtt.Connection | None = None
        self._mids: dict[int, str] = {}  # paho mid -> msg_id, in flight on this connection
        self._by_msg: dict[str, int] = {}
        self._paused_until = 0.0
        self._refusals = 0
        self._stopping = False
        device.watch(self)

    def stop(self, task: asyncio.Task[None]) -> None:
        """Stop ``task`` (the one running ``run``) for good; await it afterwards."""
        self._stopping = True
        task.cancel()

    def poke(self) -> None:
        """Something may have become sendable: run the drain loop."""
        self.idle.clear()
        self._wake.set()

    @property
    def device_id(self) -> str:
        """The device this transport serves."""
        return self.device.device_id

    # -- what the device tells us (DeviceObserver) ---------------------------------
    def dropped(self, msg_ids: list[str], reason: DropReason) -> None:
        """Take withdrawn or wiped items back out of the MQTT client (P2, P9)."""
        self._recall(msg_ids)

    def sendable(self) -> None:
        """Something may have become sendable."""
        self.poke()

    def queued(self, msg_id: str, purpose: Purpose, at: float) -> None:
        """A capture: ``sendable`` follows."""

    def acknowledged(self, msg_id: str, at: float) -> None:
        """Our own PUBACK handling reported it."""

    # -- the connection loop ---------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff, until cancelled."""
        attempt = 0
        while True:
            schedule = backoff.CONNECTION
            self.stats.attempts += 1
            connects = self.stats.connects
            try:
                await self._session()
            except CertificateProblem as exc:
                schedule = backoff.CERTIFICATE
                self._failed(exc)
            except TransportError as exc:
                self._failed(exc)
            finally:
                self._lost()
            if self._stopping:
                # aiomqtt's disconnect may turn our cancellation into an MqttError.
                raise asyncio.CancelledError
            if self.stats.connects > connects:
                attempt = 0  # it was connected: the schedule starts again
            delay = schedule.delay(attempt, self.rng)
            attempt += 1
            log.info("reconnecting", extra={"device": self.device_id, "delay_s": round(delay, 2)})
            await asyncio.sleep(delay)

    def _failed(self, exc: TransportError) -> None:
        self.stats.last_error = str(exc)
        self.stats.last_error_kind = getattr(exc, "kind", type(exc).__name__)
        self.trouble.set()
        level = logging.ERROR if isinstance(exc, CertificateProblem) else logging.WARNING
        log.log(
            level,
            "connection failed",
            extra={"device": self.device_id, "error": str(exc), "kind": type(exc).__name__},
        )

    def _options(self) -> mqtt.Options:
        t = self.target
        return mqtt.Options(
            host=t.host,
            port=t.port,
            tls=t.tls,
            client_id=self.device_id,
            protocol=t.protocol,
            keepalive=t.keepalive,
            connect_timeout=t.connect_timeout,
            persistent=True,  # commands sent while the device was offline arrive
            session_expiry_s=SESSION_EXPIRY_S,
            max_inflight=self.window,
        )

    async def _session(self) -> None:
        """One connection, from CONNECT to its loss; always ends with an exception."""
        log_ = mqtt.LastErrorLog("smartmi.mqtt", {"device": self.device_id})
        async with mqtt.connect(self._options(), on_puback=self._on_puback, logger=log_) as conn:
            self._conn = conn
            self.stats.connects += 1
            if self.stats.first_connected_at is None:
                self.stats.first_connected_at = self.clock()
            self.connected.set()
            log.info("connected", extra={"device": self.device_id})
            await conn.subscribe(down_filter(self.device_id), qos=1)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._drain(conn), name=f"drain:{self.device_id}")
                tg.create_task(self._receive(conn), name=f"commands:{self.device_id}")
        raise TransportError("the connection ended")

    def _lost(self) -> None:
        """The connection is gone: in-flight items wait in the outbox again."""
        self.connected.clear()
        self.idle.clear()
        self._conn = None
        self._mids.clear()
        self._by_msg.clear()
        self.device.connection_lost()

    # -- outgoing ----------------------------------------------------------------
    async def _drain(self, conn: mqtt.Connection) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            timeout = HOUSEKEEPING_S
            if now < self._paused_until:
                timeout = self._paused_until - now
            else:
                room = self.window - len(self._mids)
                if room > 0:
                    batch = self.device.next_batch(now=now, limit=room)
                    for out in batch:
                        self._publish(conn, out.msg_id, out.kind, out.payload)
                    if not batch and not self._mids:
                        self.idle.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _publish(self, conn: mqtt.Connection, msg_id: str, kind: str, payload: bytes) -> None:
        try:
            mid = conn.publish_nowait(up_topic(self.device_id, kind), payload)
        except TransportError:
            self.device.retry(msg_id)
            raise
        self._mids[mid] = msg_id
        self._by_msg[msg_id] = mid
        self.stats.published += 1

    def _on_puback(self, ack: mqtt.PubAck) -> None:
        msg_id = self._mids.pop(ack.mid, None)
        if msg_id is None:
            return
        self._by_msg.pop(msg_id, None)
        now = self.clock()
        if ack.refused:
            self.stats.refused += 1
            refused = PublishRefused(msg_id, ack.code, ack.reason)
            self.stats.last_error = str(refused)
            self.stats.last_error_kind = "publish-refused"
            self.trouble.set()
            log.error("publish refused", extra={"device": self.device_id, "error": str(refused)})
            self.device.retry(msg_id)
            self._paused_until = now + backoff.REFUSED.delay(self._refusals, self.rng)
            self._refusals += 1
        else:
            self._refusals = 0
            self.stats.acknowledged += 1
            if self.ack_sink is not None:
                self.ack_sink(self, msg_id, now)
                return
            self.record_ack(msg_id, now)
        self.poke()

    def record_ack(self, msg_id: str, now: float) -> None:
        """Tell the device the broker acknowledged ``msg_id`` (ledgered, removed)."""
        try:
            self.device.acknowledged(msg_id, now=now)
        except AgentError as exc:
            # The item stays queued and is sent again: at-least-once.
            log.exception("cannot record acknowledgement", extra={"error": str(exc)})

    def _recall(self, msg_ids: list[str]) -> None:
        """Take withdrawn or wiped items back out of the MQTT client (P2, P9)."""
        conn = self._conn
        if conn is None:
            return
        for msg_id in msg_ids:
            mid = self._by_msg.get(msg_id)
            if mid is not None and conn.unsend(mid):
                del self._by_msg[msg_id]
                del self._mids[mid]
                self.stats.recalled += 1
            # Otherwise it is on the wire: its PUBACK is recorded as sent (P11).

    # -- incoming ----------------------------------------------------------------
    async def _receive(self, conn: mqtt.Connection) -> None:
        prefix = down_filter(self.device_id).removesuffix("+")
        async for message in conn.incoming():
            topic, payload = message.topic, message.payload
            if not topic.startswith(prefix) or payload is None:
                self._rejected("", CommandRejected("bad-topic"), self.clock())
                continue
            self.handle_command(topic.removeprefix(prefix), payload)

    def handle_command(self, name: str, payload: bytes) -> None:
        """Validate and apply one command; hostile input is logged, never raised."""
        now = self.clock()
        try:
            command = commands.parse(name, payload)
            self.guard.admit(command, now=now)
            result = apply(self.device, command, now=now)
        except CommandRejected as exc:
            self._rejected(name, exc, now)
            return
        except AgentError as exc:
            self._rejected(name, CommandRejected(type(exc).__name__, str(exc)), now)
            return
        self.stats.commands_applied += 1
        log.info(
            "command applied",
            extra={"device": self.device_id, "command": name, "command_id": command.command_id},
        )
        if self.command_listener is not None:
            self.command_listener(name, result, now)
        self.poke()

    def _rejected(self, name: str, exc: CommandRejected, now: float) -> None:
        self.stats.commands_rejected += 1
        log.warning(
            "command rejected",
            extra={
                "device": self.device_id,
                "command": name[:64],
                "reason": exc.reason,
                "command_id": exc.command_id,
            },
        )
        if self.command_listener is not None:
            self.command_listener(name, exc, now)

    def status(self) -> dict[str, Any]:
        """Connection counters for ``smartmi-agent status``."""
        s = self.stats
        return {
            "connected": self.connected.is_set(),
            "attempts": s.attempts,
            "connects": s.connects,
            "in_flight": len(self._mids),
            "published": s.published,
            "acknowledged": s.acknowledged,
            "refused": s.refused,
            "recalled": s.recalled,
            "commands_applied": s.commands_applied,
            "commands_rejected": s.commands_rejected,
            "last_error": s.last_error,
        }
