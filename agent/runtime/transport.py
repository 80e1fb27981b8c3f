"""The MQTT transport: mutual TLS, QoS 1 hand-off of the outbox, reconnects.

``agent.runtime.mqtt`` (aiomqtt over paho-mqtt) runs the connection: paho's own TLS
socket on our event loop. The transport carries out what the device decides, and
``agent.runtime.commands`` takes what the cloud sends on the same connection:

* **Commands first, acknowledged after they take effect** (SPEC §3): each command
  is taken as paho reads the socket (``Commands.on_message``). Until the cloud has
  answered the command sync (``synced``) only deletion requests leave, and every
  hand-over of the outbox first reads what the broker has already delivered
  (``Connection.read_waiting``): a narrowing choice on the socket covers what was
  captured while the event loop was busy elsewhere.
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
(``agent.runtime.target``), so commands sent while the device was offline arrive. It
is opened by a ``Connector`` (``agent.runtime.link``): the adapter's ``mqtt.connect``,
or a test's fake broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.core import backoff
from agent.core.identity import down_filter, up_topic
from agent.core.items import DropReason
from agent.core.purposes import Purpose
from agent.device import Device
from agent.errors import AgentError, CertificateProblem, PublishRefused, TransportError
from agent.runtime import mqtt
from agent.runtime.commands import CommandListener, Commands
from agent.runtime.link import Connector, Link
from agent.runtime.target import BrokerTarget
from agent.runtime.waits import Flag, wait_at_most

log = logging.getLogger("smartmi.transport")

HOUSEKEEPING_S = 600.0  # the drain loop wakes at least this often while idle
# A full socket is awaited: the adapter pokes the drain when it took paho's last bytes.
# This is only the backstop, should that word be missed.
BLOCKED_BACKSTOP_S = 1.0
NO_SUBSCRIBERS = 0x10  # MQTT v5 PUBACK: accepted, but nobody subscribed (§3.4.2.1)


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
        ack_sink: AckSink | None = None,
        connector: Connector = mqtt.connect,
    ) -> None:
        self.device = device
        self.target = target
        self._endpoint = 0  # which of the target's endpoints to connect to next
        self._acked_unlogged = 0  # acknowledgements since the last "acknowledged" line
        self.window = window
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self.ack_sink = ack_sink
        self.stats = TransportStats()
        # The cloud's side of the connection: the command sync and every command.
        self.commands = Commands(
            device, self.stats, clock=clock, rng=self.rng, wake=self.poke, listener=command_listener
        )
        self.connected = Flag()
        # Set once the cloud answered this connection's command sync (commands first).
        self.synced = self.commands.synced
        # Set while synced with nothing in flight and nothing sendable right now.
        self.idle = Flag()
        # Set on every failed connection or refused PUBLISH; callers clear it.
        self.trouble = Flag()
        self._wake = Flag()
        self._connect = connector  # the MQTT adapter's, or a test's fake
        self._conn: Link | None = None
        # paho's packet id -> msg_id, on this connection; the item itself is the device's
        self._flying: dict[int, str] = {}
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
        if any(self._stopped_item(m, purposes) for m in self._flying.values()):
            self.stats.aborted += 1
            log.warning(
                "connection aborted: a message of a stopped purpose was not fully written",
                extra={"device": self.device_id, "purposes": sorted(p.value for p in purposes)},
            )
            conn.abort()

    def _stopped_item(self, msg_id: str, purposes: frozenset[Purpose]) -> bool:
        """Whether the item handed over as ``msg_id`` is of ``purposes``; one the device
        no longer holds (a wipe forgot it) counts as stopped (fail closed)."""
        out = self.device.flight(msg_id)
        return out is None or out.purpose in purposes

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

    async def _session(self) -> None:
        """One connection, from CONNECT to its loss; always ends with an exception."""
        log_ = mqtt.LastErrorLog("smartmi.mqtt", {"device": self.device_id})
        async with self._connect(
            self.target.options(self._endpoint, self.device_id, self.window),
            on_puback=self._on_puback,
            on_message=self.commands.on_message,
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
                tg.create_task(self.commands.sync(conn), name=f"sync:{self.device_id}")
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
        self.commands.lost()
        self.idle.clear()
        self._conn = None
        self._flying.clear()
        self.device.connection_lost(now=self.clock())

    # -- outgoing ----------------------------------------------------------------
    async def _drain(self, conn: Link) -> None:
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
            await wait_at_most(self._wake, timeout)

    def _hand_over(self, conn: Link, now: float) -> None:
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
            self._flying[mid] = out.msg_id
            self.stats.published += 1
            handed += 1
            conn.flush()
        if handed:
            log.info("published", extra={"device": self.device_id, "count": handed})
        if synced and not batch and not self._flying:
            self.idle.set()

    def _on_puback(self, ack: mqtt.PubAck) -> None:
        msg_id = self._flying.pop(ack.mid, None)
        now = self.clock()
        if msg_id is None:  # a sync request's PUBACK
            if ack.refused:
                self._undelivered(PublishRefused("sync", ack.code, ack.reason), now)
            return
        out = self.device.flight(msg_id)
        personal = out is None or out.purpose is not None  # None: a wipe forgot it
        if ack.refused or (ack.code == NO_SUBSCRIBERS and personal):
            self._undelivered(PublishRefused(msg_id, ack.code, ack.reason), now)
            self.device.retry(msg_id)
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
                self.ack_sink(self, msg_id, now)
                return
            self.record_ack(msg_id, now)
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
