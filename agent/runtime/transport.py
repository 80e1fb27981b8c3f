"""The MQTT transport: mutual TLS, QoS 1 hand-off of the outbox, cloud commands, reconnects.

``agent.runtime.mqtt`` (aiomqtt over paho-mqtt) runs the connection: paho's own TLS
socket on our event loop. The transport carries out what the device decides:

* **Commands first** (SPEC §3). After every (re)connect it subscribes, then sends a
  sync request on ``up/sync``; the cloud answers on ``down/sync`` after every
  command it issued before, so the broker delivers the answer behind them. Until
  the answer arrives only deletion requests leave. Without an answer (a bare broker
  with no cloud behind it) personal data keeps waiting, the request is repeated
  with backoff, and ``status`` says so. A command is taken as the socket is read,
  never queued, and every hand-over of the outbox first reads what the broker has
  already delivered: a narrowing choice on the socket covers what was captured
  while the event loop was busy elsewhere.
* **Acknowledged after it takes effect.** Commands are acknowledged by us, not by
  paho on receipt: after ``Device.take`` has made the effect durable, or refused
  the command for good. A command whose effect cannot be written is not
  acknowledged: the connection is ended so that the broker delivers it again.
* **A hand-off that needs no recall.** An item goes to paho only when paho has
  nothing left to write, and is written at once; what paho has taken has left the
  device. If a withdrawal, suspension, wipe or coarser precision stops a purpose
  while paho still holds unwritten bytes of an item of it, the connection is
  aborted before they are written (``Connection.abort``).
* An item is acknowledged to the device only on a successful PUBACK (MQTT v5
  §3.4.2.1): a reason code of 0x80 or above is a refusal, and 0x10 ("no matching
  subscribers") for personal data means nobody received it; both leave the item
  queued and pause sending with backoff.
* A lost connection sends every in-flight item back to the outbox with the same
  ``msg_id`` (at-least-once; the cloud de-duplicates by ``msg_id``); reconnects
  follow ``agent.core.backoff``, certificate problems the slow schedule.

Each connection uses a fresh paho client with a persistent session on the broker
(clean start off, a session expiry on v5), so commands sent while the device was
offline arrive.

Past 400 lines on purpose: the sync, the hand-off and the command loop share one
connection's state (what is in flight, whether the cloud has answered), which one
class keeps consistent across a connection's loss.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agent.core import backoff, commands
from agent.core.identity import down_filter, up_topic
from agent.core.items import DropReason, Outgoing
from agent.core.ordering import Clock
from agent.core.purposes import Purpose, parse_rfc3339, rfc3339
from agent.device import Device
from agent.errors import (
    AgentError,
    CertificateProblem,
    CommandRejected,
    PublishRefused,
    TransportError,
)
from agent.runtime import mqtt

log = logging.getLogger("smartmi.transport")

SESSION_EXPIRY_S = 7 * 24 * 3600  # keep commands queued for a device offline up to a week
HOUSEKEEPING_S = 600.0  # the drain loop wakes at least this often while idle
# A full socket is awaited: the adapter pokes the drain when it took paho's last bytes.
# This is only the backstop, should that word be missed.
BLOCKED_BACKSTOP_S = 1.0
NO_SUBSCRIBERS = 0x10  # MQTT v5 PUBACK: accepted, but nobody subscribed (§3.4.2.1)
# The command sync is repeated while no answer comes: after 10-15 s, then doubling to
# 5 min. Both the request and the answer are QoS 1 on persistent sessions, and an answer
# to any request of the connection counts, so a repeat is for what a broker or a cloud
# lost; 5 s was shorter than a busy cloud's answer, and 10,000 simulated devices then
# sent four requests each.
SYNC_RETRY = backoff.Backoff(base=15.0, cap=300.0, floor=10.0)


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """Where and how to connect."""

    host: str
    port: int
    tls: ssl.SSLContext
    protocol: Literal["v5", "v311"] = "v5"
    keepalive: int = 60
    connect_timeout: float = 15.0
    # Other nodes of a clustered broker (host, port): after a failed or lost
    # connection the next one is tried, so one node down does not strand the device.
    fallbacks: tuple[tuple[str, int], ...] = ()

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Every address, the first one first."""
        return ((self.host, self.port), *self.fallbacks)


@dataclass(slots=True)
class TransportStats:
    """Counters for status output and the simulator's report (no personal values)."""

    attempts: int = 0
    connects: int = 0
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    aborted: int = 0
    syncs: int = 0
    commands_applied: int = 0
    commands_ignored: int = 0
    commands_rejected: int = 0
    first_connected_at: float | None = None
    last_error: str | None = None
    last_error_kind: str | None = None


# (command name, what it did or why it was refused, the time the device acted)
CommandListener = Callable[[str, "dict[str, Any] | CommandRejected", float], None]
# Records one acknowledgement: (transport, msg_id, time); the default is ``record_ack``.
AckSink = Callable[["Transport", str, float], None]


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``; a cancellation always propagates.

    Python 3.11's ``asyncio.timeout`` can turn a cancellation that arrives as the
    timeout expires into TimeoutError; a loop that ignored it would never end, and the
    TaskGroup around it (a connection being stopped) would wait for ever.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None


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
        ack_sink: AckSink | None = None,
    ) -> None:
        self.device = device
        self.target = target
        self._endpoint = 0  # which of the target's endpoints to connect to next
        self._acked_unlogged = 0  # acknowledgements since the last "acknowledged" line
        self.window = window
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self.command_listener = command_listener
        self.ack_sink = ack_sink
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        # Set once the cloud answered this connection's command sync (commands first).
        self.synced = asyncio.Event()
        # Set while synced with nothing in flight and nothing sendable right now.
        self.idle = asyncio.Event()
        # Set on every failed connection or refused PUBLISH; callers clear it.
        self.trouble = asyncio.Event()
        self._wake = asyncio.Event()
        self._conn: mqtt.Connection | None = None
        self._flying: dict[int, Outgoing] = {}  # paho mid -> item, on this connection
        # This connection's command sync requests awaiting an answer: sync_id -> sent at.
        # Any of them answered is enough (each covers every command issued before this
        # connection); a request from an earlier connection is not.
        self._syncs: dict[str, float] = {}
        self._paused_until = 0.0
        self._refusals = 0
        self._stopping = False
        self._prefix = down_filter(device.device_id).removesuffix("+")  # down/ topics
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

    @property
    def backpressured(self) -> bool:
        """Whether the socket is full: paho holds bytes it has not written yet."""
        return self._conn is not None and self._conn.pending_write()

    # -- what the device tells us (DeviceObserver) ---------------------------------
    def stopped(self, purposes: frozenset[Purpose]) -> None:
        """Nothing of ``purposes`` may leave now: abort if paho holds unwritten bytes of one."""
        conn = self._conn
        if conn is None or not conn.pending_write():
            return  # everything handed over is on the wire: it has left (P11 ledgers it)
        if any(o.purpose in purposes for o in self._flying.values()):
            self.stats.aborted += 1
            log.warning(
                "connection aborted: a message of a stopped purpose was not fully written",
                extra={"device": self.device_id, "purposes": sorted(p.value for p in purposes)},
            )
            conn.abort()

    def sendable(self) -> None:
        """Something may have become sendable."""
        self.poke()

    def dropped(self, msg_ids: list[str], reason: DropReason) -> None:
        """Queued items were deleted: nothing to do, they were never handed over."""

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
            except AgentError as exc:  # TransportError, and a store that refused a write
                self._failed(exc)
            except BaseExceptionGroup as group:
                # From the session's task group: ours if every leaf is an AgentError.
                mine, rest = group.split(AgentError)
                if rest is not None or mine is None:
                    raise
                self._failed(_first_leaf(mine))
            finally:
                self._lost()
            if self._stopping:
                # aiomqtt's disconnect may turn our cancellation into an MqttError; stop()
                # says it was ours. (Task.cancelling() is no guide: a TaskGroup whose
                # child failed leaves it raised.)
                raise asyncio.CancelledError
            if self.stats.connects > connects:
                attempt = 0  # it was connected: the schedule starts again
            # The next node of a cluster (the same address when there is one).
            self._endpoint = (self._endpoint + 1) % len(self.target.endpoints)
            delay = schedule.delay(attempt, self.rng)
            attempt += 1
            log.info("reconnecting", extra={"device": self.device_id, "delay_s": round(delay, 2)})
            await asyncio.sleep(delay)

    def _failed(self, exc: AgentError) -> None:
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
        host, port = t.endpoints[self._endpoint % len(t.endpoints)]
        return mqtt.Options(
            host=host,
            port=port,
            tls=t.tls,
            client_id=self.device_id,
            protocol=t.protocol,
            keepalive=t.keepalive,
            connect_timeout=t.connect_timeout,
            persistent=True,  # commands sent while the device was offline arrive
            session_expiry_s=SESSION_EXPIRY_S,
            max_inflight=self.window,
            manual_ack=True,  # a command is acknowledged once its effect is durable
        )

    async def _session(self) -> None:
        """One connection, from CONNECT to its loss; always ends with an exception."""
        log_ = mqtt.LastErrorLog("smartmi.mqtt", {"device": self.device_id})
        async with mqtt.connect(
            self._options(),
            on_puback=self._on_puback,
            on_message=self._on_message,
            on_writable=self.poke,
            logger=log_,
        ) as conn:
            self._stop_if_asked()
            self._conn = conn
            self.stats.connects += 1
            if self.stats.first_connected_at is None:
                self.stats.first_connected_at = self.clock()
            self.connected.set()
            log.info("connected", extra={"device": self.device_id})
            await conn.subscribe(down_filter(self.device_id), qos=1)
            self._stop_if_asked()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(conn.ended(), name=f"link:{self.device_id}")
                tg.create_task(self._sync_loop(conn), name=f"sync:{self.device_id}")
                tg.create_task(self._drain(conn), name=f"drain:{self.device_id}")
        raise TransportError("the connection ended")

    def _stop_if_asked(self) -> None:
        """Raise CancelledError if ``stop`` was called. aiomqtt waits with Python 3.11's
        ``asyncio.wait_for``, which loses a cancellation that arrives as the awaited
        CONNACK or SUBACK does: the connection went on, and ``stop`` waited for ever."""
        if self._stopping:
            raise asyncio.CancelledError

    def _lost(self) -> None:
        """The connection is gone: in-flight items wait in the outbox again."""
        self.connected.clear()
        self.synced.clear()
        self.idle.clear()
        self._conn = None
        self._syncs.clear()
        self._flying.clear()
        self.device.connection_lost(now=self.clock())

    # -- commands first ------------------------------------------------------------
    async def _sync_loop(self, conn: mqtt.Connection) -> None:
        """Ask the cloud for the commands it issued before this connection, until it answers."""
        attempt = 0
        while not self.synced.is_set():
            sync_id = uuid.uuid4().hex
            sent = self.clock()
            self._syncs[sync_id] = sent
            body = {"sync_id": sync_id, "device_id": self.device_id, "sent_at": rfc3339(sent)}
            conn.publish_nowait(up_topic(self.device_id, "sync"), json.dumps(body).encode())
            conn.flush()
            wait = SYNC_RETRY.delay(attempt, self.rng)
            await _wait(self.synced, wait)
            if not self.synced.is_set():
                attempt += 1
                log.warning(
                    "no answer to the command sync: personal data waits for the cloud",
                    extra={"device": self.device_id, "waited_s": round(wait, 1)},
                )

    def _sync_answered(self, payload: bytes, now: float) -> None:
        answer = commands.parse_sync(payload)
        sent = self._syncs.get(answer.sync_id)
        if sent is None:
            return  # an answer to an earlier connection's request, or a repeated one
        clock = Clock.from_sync(sent, parse_rfc3339(answer.now), now)
        self.device.clock_compared(clock, now=now)
        self.stats.syncs += 1
        self._syncs.clear()
        self.synced.set()
        log.info(
            "commands synced",
            extra={
                "device": self.device_id,
                "clock_offset_s": round(clock.offset, 3),
                "clock_error_s": round(clock.error, 3),
            },
        )
        self.poke()

    # -- outgoing ----------------------------------------------------------------
    async def _drain(self, conn: mqtt.Connection) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            timeout = HOUSEKEEPING_S
            if now < self._paused_until:
                timeout = self._paused_until - now
            elif conn.pending_write():
                timeout = BLOCKED_BACKSTOP_S  # the socket is full: hand over nothing more
            else:
                self._hand_over(conn, now)
                if conn.pending_write():
                    timeout = BLOCKED_BACKSTOP_S
            await _wait(self._wake, timeout)

    def _hand_over(self, conn: mqtt.Connection, now: float) -> None:
        """Give paho what it can write now, one item at a time (no recall needed).

        Commands first, also between two hand-overs: what the broker has already
        delivered to the socket is read and taken before anything is handed over, so
        a narrowing choice on its way in covers the items captured meanwhile (the
        socket's reader would have got to it only after this turn of the loop).
        """
        conn.read_waiting()
        if conn.broken:
            return
        room = self.window - len(self._flying)
        synced = self.synced.is_set()
        batch = self.device.next_batch(now=now, limit=room, personal=synced) if room > 0 else []
        handed = 0
        for n, out in enumerate(batch):
            if conn.pending_write():
                # The socket is full: the rest was never handed over and waits.
                self.device.give_back([o.msg_id for o in batch[n:]])
                break
            try:
                mid = conn.publish_nowait(up_topic(self.device_id, out.kind), out.payload)
            except TransportError:
                self.device.give_back([o.msg_id for o in batch[n:]])
                raise
            self._flying[mid] = out
            self.stats.published += 1
            handed += 1
            conn.flush()
        if handed:
            log.info("published", extra={"device": self.device_id, "count": handed})
        if synced and not batch and not self._flying:
            self.idle.set()

    def _on_puback(self, ack: mqtt.PubAck) -> None:
        out = self._flying.pop(ack.mid, None)
        now = self.clock()
        if out is None:  # a sync request's PUBACK
            if ack.refused:
                self._undelivered(PublishRefused("sync", ack.code, ack.reason), now)
            return
        nobody = ack.code == NO_SUBSCRIBERS and out.purpose is not None
        if ack.refused or nobody:
            self._undelivered(PublishRefused(out.msg_id, ack.code, ack.reason), now)
            self.device.retry(out.msg_id)
            self._paused_until = now + backoff.REFUSED.delay(self._refusals, self.rng)
            self._refusals += 1
        else:
            self._refusals = 0
            self.stats.acknowledged += 1
            self._acked_unlogged += 1
            if not self._flying:  # a batch is done: one line with its count
                log.info(
                    "acknowledged", extra={"device": self.device_id, "count": self._acked_unlogged}
                )
                self._acked_unlogged = 0
            if self.ack_sink is not None:
                self.ack_sink(self, out.msg_id, now)
                return
            self.record_ack(out.msg_id, now)
        self.poke()

    def _undelivered(self, refused: PublishRefused, now: float) -> None:
        self.stats.refused += 1
        self.stats.last_error = str(refused)
        self.stats.last_error_kind = (
            "no-subscribers" if refused.reason_code == NO_SUBSCRIBERS else "publish-refused"
        )
        self.trouble.set()
        log.error("publish not delivered", extra={"device": self.device_id, "error": str(refused)})

    def record_ack(self, msg_id: str, now: float) -> None:
        """Tell the device the broker acknowledged ``msg_id`` (ledgered, removed)."""
        try:
            self.device.acknowledged(msg_id, now=now)
        except AgentError as exc:
            # The item stays queued and is sent again: at-least-once.
            log.error("cannot record acknowledgement", extra={"error": str(exc)})  # noqa: TRY400  # an expected failure, no traceback

    # -- incoming ----------------------------------------------------------------
    def _on_message(self, message: mqtt.Incoming) -> None:
        """One message from the broker, taken as the socket is read; the adapter
        acknowledges it when this returns."""
        prefix = self._prefix
        topic, payload = message.topic, message.payload
        now = self.clock()
        if not topic.startswith(prefix) or payload is None:
            self._rejected("", CommandRejected("bad-topic"), now)
        elif topic == prefix + "sync":
            try:
                self._sync_answered(payload, now)
            except CommandRejected as exc:
                self._rejected("sync", exc, now)
        else:
            # An effect that cannot be made durable raises here: not acknowledged, the
            # connection ends, and the broker delivers the command again.
            self.handle_command(topic.removeprefix(prefix), payload)

    def handle_command(self, name: str, payload: bytes) -> None:
        """Validate and carry out one command; hostile input is logged, never raised.

        Returns once the effect is durable (or the command is refused for good);
        raises TransportError if the effect could not be written.
        """
        now = self.clock()
        try:
            command = commands.parse(name, payload)
            taken = self.device.take(command, now=now)
        except CommandRejected as exc:
            self._rejected(name, exc, now)
            return
        except AgentError as exc:
            log.error(  # noqa: TRY400  # an expected failure, no traceback
                "command not applied: its effect could not be written",
                extra={"device": self.device_id, "command": name, "error": str(exc)},
            )
            raise TransportError(f"command {name} not applied: {exc}") from exc
        if taken.applied:
            self.stats.commands_applied += 1
        else:
            self.stats.commands_ignored += 1
        log.info(
            "command taken",
            extra={
                "device": self.device_id,
                "command": name,
                "command_id": command.command_id,
                "result": taken.result,
            },
        )
        if self.command_listener is not None:
            self.command_listener(name, taken.result, now)
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
            "commands_synced": self.synced.is_set(),
            "attempts": s.attempts,
            "connects": s.connects,
            "in_flight": len(self._flying),
            "published": s.published,
            "acknowledged": s.acknowledged,
            "refused": s.refused,
            "aborted": s.aborted,
            "backpressured": self.backpressured,
            "commands_applied": s.commands_applied,
            "commands_ignored": s.commands_ignored,
            "commands_rejected": s.commands_rejected,
            "last_error": s.last_error,
        }


def _first_leaf(group: BaseExceptionGroup[AgentError]) -> AgentError:
    """The first exception in a (nested) group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
