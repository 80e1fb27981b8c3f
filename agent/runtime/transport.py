"""The MQTT transport: mutual TLS, QoS 1 hand-off of the outbox, cloud commands, reconnects.

aiomqtt (over paho-mqtt) runs the connection: paho's own TLS socket on our event
loop, so a connection costs no asyncio SSL transport buffers. The transport
carries out what the device core decides and nothing more:

* an item leaves only when ``DeviceCore.next_batch`` hands it over (P1), and is
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

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.core import backoff, commands
from agent.core.identity import down_filter, up_topic
from agent.device import DeviceCore
from agent.errors import (
    AgentError,
    CertificateProblem,
    CommandRejected,
    PublishRefused,
    TransportError,
)
from agent.runtime.tls import classify_tls_error
from agent.store.database import Database

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


class AckBatch:
    """Acknowledgements from many transports over one store, recorded in one transaction.

    The simulator's devices share one SQLite file; PUBACKs that arrive in the same
    event-loop iteration are written together instead of one commit each. An item is
    only removed from the outbox inside that transaction, so a crash before it leaves
    the item queued and it is sent again (at-least-once, same msg_id).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[tuple[Transport, str, float]] = []

    def add(self, transport: Transport, msg_id: str, now: float) -> None:
        """Queue one acknowledgement; the batch is written on the next loop iteration."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append((transport, msg_id, now))

    def flush(self) -> None:
        """Write every queued acknowledgement in one transaction, each in a savepoint."""
        batch, self._pending = self._pending, []
        with self.db.transaction() as conn:
            for transport, msg_id, now in batch:
                conn.execute("SAVEPOINT ack")
                try:
                    transport.core.acknowledged(msg_id, now=now)
                except AgentError as exc:
                    # Only this one is undone: it stays queued and is sent again.
                    conn.execute("ROLLBACK TO ack")
                    log.error("cannot record acknowledgement", extra={"error": str(exc)})  # noqa: TRY400  # an expected failure, no traceback
                conn.execute("RELEASE ack")
        for transport in {t for t, _m, _n in batch}:
            transport.poke()


class _Client(aiomqtt.Client):
    """aiomqtt's client, passing PUBACK reason codes on (aiomqtt's own publish drops them)."""

    def __init__(self, *args: Any, on_puback: Callable[[int, ReasonCode], None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._on_puback = on_puback

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        self._on_puback(mid, reason_code)

    @property
    def paho(self) -> paho.Client:
        """The underlying paho client."""
        return self._client

    def failure(self) -> BaseException | None:
        """Why the connection broke, if it did (aiomqtt keeps it on a private future)."""
        fut = self._disconnected
        return fut.exception() if fut.done() and not fut.cancelled() else None


class _PahoLog(logging.LoggerAdapter[logging.Logger]):
    """paho's log for one device; keeps its last error, which may name a TLS alert.

    When the broker refuses our certificate after a TLS 1.3 handshake, the alert
    arrives on paho's first read, and paho logs it rather than raising it.
    """

    def __init__(self, transport: Transport) -> None:
        super().__init__(logging.getLogger("smartmi.mqtt"), {"device": transport.device_id})
        self._transport = transport

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            self._transport.paho_error = str(msg) % args if args else str(msg)
        super().log(level, msg, *args, **kwargs)


def _unsend(client: paho.Client, mid: int) -> bool:
    """Take a PUBLISH that has not started onto the wire back out of paho (P2).

    paho keeps packets not yet written in ``_out_packet`` and QoS 1 messages until
    their PUBACK in ``_out_messages``; it has no public API to remove either. A
    packet partly or wholly written has left the device and stays.
    """
    with client._out_message_mutex:  # see the docstring
        msg = client._out_messages.get(mid)
        if msg is None:
            return False
        packets = client._out_packet
        packet = next(
            (p for p in packets if p["mid"] == mid and p["command"] & 0xF0 == paho.PUBLISH),
            None,
        )
        if packet is not None:
            if packet["pos"] > 0:
                return False
            packets.remove(packet)
        elif msg.state != paho.mqtt_ms_queued:
            return False
        del client._out_messages[mid]
        if msg.state != paho.mqtt_ms_queued:
            client._inflight_messages -= 1
        return True


def _classify(exc: BaseException) -> TransportError:
    """Map an aiomqtt/paho/ssl failure to our error tree."""
    if isinstance(exc, TransportError):
        return exc
    problem = classify_tls_error(exc)
    if problem is not None:
        return problem
    return TransportError(f"{type(exc).__name__}: {exc}")


class Transport:
    """One device's connection to the broker, for as long as ``run`` runs."""

    def __init__(
        self,
        core: DeviceCore,
        target: BrokerTarget,
        *,
        window: int = 20,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        command_listener: CommandListener | None = None,
        guard: commands.ReplayGuard | None = None,
        ack_batch: AckBatch | None = None,
    ) -> None:
        self.core = core
        self.target = target
        self.window = window
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self.command_listener = command_listener
        self.guard = guard or commands.ReplayGuard()
        self.ack_batch = ack_batch
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        # Set while connected with nothing in flight and nothing sendable right now.
        self.idle = asyncio.Event()
        # Set on every failed connection or refused PUBLISH; callers clear it.
        self.trouble = asyncio.Event()
        self._wake = asyncio.Event()
        self._client: _Client | None = None
        self._mids: dict[int, str] = {}  # paho mid -> msg_id, in flight on this connection
        self._by_msg: dict[str, int] = {}
        self._paused_until = 0.0
        self._refusals = 0
        self.paho_error: str | None = None  # the last error paho logged
        self._stopping = False
        core.purge_listeners.append(self._recall)
        core.wake_listeners.append(self.poke)

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
        return self.core.device_id

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

    def _new_client(self) -> _Client:
        t = self.target
        v5 = t.protocol == "v5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        return _Client(
            t.host,
            t.port,
            identifier=self.device_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            # v5: resume the broker-side session (queued commands); paho refuses the
            # option on 3.1.1, where clean_session=False does the same.
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            logger=_PahoLog(self),  # a LoggerAdapter: paho and aiomqtt only call .log and friends
            properties=props,
            keepalive=t.keepalive,
            tls_context=t.tls,
            timeout=t.connect_timeout,
            max_inflight_messages=self.window,
            on_puback=self._on_puback,
        )

    async def _session(self) -> None:
        """One connection, from CONNECT to its loss; always ends with an exception."""
        self.paho_error = None
        client = self._new_client()
        self._client = client
        try:
            async with client:
                self.stats.connects += 1
                if self.stats.first_connected_at is None:
                    self.stats.first_connected_at = self.clock()
                self.connected.set()
                log.info("connected", extra={"device": self.device_id})
                await client.subscribe(down_filter(self.device_id), qos=1)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._drain(client), name=f"drain:{self.device_id}")
                    tg.create_task(self._receive(client), name=f"commands:{self.device_id}")
        except* aiomqtt.MqttError as group:
            cause = client.failure() or group.exceptions[0]
            problem = classify_tls_error(Exception(self.paho_error or ""))
            raise (problem or _classify(cause)) from None
        except* (OSError, ssl.SSLError) as group:
            raise _classify(group.exceptions[0]) from None
        finally:
            # A connection that failed half-way (a refused certificate, a timeout)
            # leaves paho's socket open; close it and its wake-up pair now.
            client.paho._reset_sockets()  # paho has no public close
        raise TransportError("the connection ended")

    def _lost(self) -> None:
        """The connection is gone: in-flight items wait in the outbox again."""
        self.connected.clear()
        self.idle.clear()
        self._client = None
        self._mids.clear()
        self._by_msg.clear()
        self.core.connection_lost()

    # -- outgoing ----------------------------------------------------------------
    async def _drain(self, client: _Client) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            timeout = HOUSEKEEPING_S
            if now < self._paused_until:
                timeout = self._paused_until - now
            else:
                room = self.window - len(self._mids)
                if room > 0:
                    batch = self.core.next_batch(now=now, limit=room)
                    for out in batch:
                        self._publish(client, out.msg_id, out.kind, out.payload)
                    if not batch and not self._mids:
                        self.idle.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _publish(self, client: _Client, msg_id: str, kind: str, payload: bytes) -> None:
        info = client.paho.publish(up_topic(self.device_id, kind), payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.core.requeue(msg_id)
            raise aiomqtt.MqttCodeError(info.rc, "could not publish")
        self._mids[info.mid] = msg_id
        self._by_msg[msg_id] = info.mid
        self.stats.published += 1

    def _on_puback(self, mid: int, reason_code: ReasonCode) -> None:
        msg_id = self._mids.pop(mid, None)
        if msg_id is None:
            return
        self._by_msg.pop(msg_id, None)
        now = self.clock()
        if reason_code.is_failure:
            self.stats.refused += 1
            refused = PublishRefused(msg_id, int(reason_code.value), str(reason_code))
            self.stats.last_error = str(refused)
            self.stats.last_error_kind = "publish-refused"
            self.trouble.set()
            log.error("publish refused", extra={"device": self.device_id, "error": str(refused)})
            self.core.requeue(msg_id)
            self._paused_until = now + backoff.REFUSED.delay(self._refusals, self.rng)
            self._refusals += 1
        else:
            self._refusals = 0
            self.stats.acknowledged += 1
            if self.ack_batch is not None:
                self.ack_batch.add(self, msg_id, now)
                return
            self.record_ack(msg_id, now)
        self.poke()

    def record_ack(self, msg_id: str, now: float) -> None:
        """Tell the core the broker acknowledged ``msg_id`` (ledgered, removed)."""
        try:
            self.core.acknowledged(msg_id, now=now)
        except AgentError as exc:
            # The item stays queued and is sent again: at-least-once.
            log.exception("cannot record acknowledgement", extra={"error": str(exc)})

    def _recall(self, msg_ids: list[str]) -> None:
        """Purge listener: take withdrawn or wiped items back out of paho (P2, P9)."""
        client = self._client
        if client is None:
            return
        for msg_id in msg_ids:
            mid = self._by_msg.get(msg_id)
            if mid is not None and _unsend(client.paho, mid):
                del self._by_msg[msg_id]
                del self._mids[mid]
                self.stats.recalled += 1
            # Otherwise it is on the wire: its PUBACK is recorded as sent (P11).

    # -- incoming ----------------------------------------------------------------
    async def _receive(self, client: _Client) -> None:
        prefix = down_filter(self.device_id).removesuffix("+")
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            if not topic.startswith(prefix) or not isinstance(payload, bytes | bytearray):
                self._rejected("", CommandRejected("bad-topic"), self.clock())
                continue
            self.handle_command(topic.removeprefix(prefix), bytes(payload))

    def handle_command(self, name: str, payload: bytes) -> None:
        """Validate and apply one command; hostile input is logged, never raised."""
        now = self.clock()
        try:
            command = commands.parse(name, payload)
            self.guard.admit(command, now=now)
            result = commands.apply(self.core, command, now=now)
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
