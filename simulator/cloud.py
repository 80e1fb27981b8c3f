"""The cloud side of the fleet: a backend client that receives every ``up/`` and sends commands.

It connects with the backend identity (the only one the ACL lets read every
device's ``up/`` and write every ``down/``), records each message with its arrival
time for the checker, and lets callers await a condition on what arrived. On a NATS
cluster it reads the uplink from JetStream instead (``simulator/jetstream.py``), with
the time the broker stored each message; commands go down over MQTT either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from agent.core.identity import BACKEND_ID, UP_FILTER_ALL, up_filter
from agent.core.purposes import rfc3339
from agent.errors import NotSent, PublishRefused, TransportError
from agent.runtime import mqtt
from agent.runtime.tls import client_context
from simulator.jetstream import JetStreamAt, Uplink, UplinkReader
from simulator.pki import DevPki

if TYPE_CHECKING:
    from simulator.broker import LocalBroker


CONNECT_WITHIN_S = 30.0  # the backend's first connection, or the run gives up
OPERATION_TIMEOUT_S = 120.0
SEND_WITHIN_S = 300.0  # a command or sync answer, resent over new connections until then
RESEND_AFTER_S = 5.0  # at the latest, on a connection that failed a send but lives on
SUBSCRIBE_BATCH = 500  # filters per SUBSCRIBE packet (a shard subscribes per device)


@dataclass(frozen=True)
class Received:
    """One message as the cloud received it."""

    device_id: str
    kind: str
    payload: bytes
    arrived_at: float
    # When the broker stored it, by the broker's clock (JetStream's timestamp): it had
    # left the device by then. None where the broker does not say (Mosquitto).
    stored_at: float | None = None

    def envelope(self) -> dict[str, Any]:
        """The decoded JSON envelope ({} if it is not JSON)."""
        try:
            value = json.loads(self.payload)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @functools.cached_property
    def msg_id(self) -> str | None:
        """The envelope's msg_id, if it has one (parsed once)."""
        value = self.envelope().get("msg_id")
        return value if isinstance(value, str) else None


@dataclass
class Cloud:
    """The backend's MQTT client and what it has received so far."""

    host: str
    port: int
    pki: DevPki
    tls: ssl.SSLContext | None = None  # the backend's identity, if not the dev PKI's
    protocol: Literal["v5", "v311"] = "v5"  # v311 on NATS, which has no MQTT 5
    # Keep the backend's session across reconnects, so the broker holds what arrives
    # meanwhile: on NATS (JetStream); not on Mosquitto 2.0.11, see connected().
    persistent: bool = False
    # Other nodes of a clustered broker, tried in turn after a failed or lost connection.
    fallback_ports: tuple[int, ...] = ()
    # A NATS cluster's JetStream: read the uplink there, not over MQTT. None: subscribe
    # to up/ over MQTT.
    jetstream: JetStreamAt | None = None
    reader: UplinkReader | None = None
    _endpoint: int = 0
    # One of several backend consumers (a fleet shard): its own identity and client
    # ID, and only these devices' messages are its business (None: every device's).
    client_id: str = BACKEND_ID
    devices: frozenset[str] | None = None
    last_error: str | None = None  # why the last connection failed or ended
    clock: Callable[[], float] = time.time
    received: list[Received] = field(default_factory=list)
    # Who waits in wait_for: a predicate over what arrived, and its future.
    _waiters: list[tuple[Callable[[list[Received]], bool], asyncio.Future[None]]] = field(
        default_factory=list
    )
    _checking: bool = False
    _conn: mqtt.Connection | None = None
    online: asyncio.Event = field(default_factory=asyncio.Event)
    online_at: list[float] = field(default_factory=list)  # each (re)subscription
    connects: int = 0
    # Answer the devices' command syncs (SPEC §3); a test turns this off to play a
    # bare broker with no cloud behind it.
    answer_syncs: bool = True
    # The sync requests left unanswered while ``answer_syncs`` was off, in arrival
    # order: (device_id, payload); ``answer_held`` answers one late.
    held_syncs: list[tuple[str, bytes]] = field(default_factory=list)
    syncs_seen: int = 0
    delivered_to_us: int = 0  # every message the broker sent this consumer, kept or not
    syncs_answered: int = 0
    # Every command issued, in order: (device_id, name, document), for replays.
    issued: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    _issuing: dict[str, set[asyncio.Future[float]]] = field(default_factory=dict)
    # Set, and replaced by a new one, each time the connection goes or a new one is up.
    _switched: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stopping: bool = False

    @classmethod
    def on(cls, broker: LocalBroker, pki: DevPki) -> Cloud:
        """The backend of a broker the simulator started: its protocol, its session
        (persistent on NATS), and the other nodes of a cluster to fall back on."""
        return cls(
            broker.host,
            broker.port,
            pki,
            protocol=broker.protocol,
            persistent=broker.backend_persistent,
            fallback_ports=tuple(broker.ports[1:]),
            jetstream=broker.jetstream,
        )

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[Cloud]:
        """Connect, subscribe to every device's up/, and collect until the block ends.

        The backend reconnects at once. On Mosquitto it starts a clean session on every
        connection (``persistent`` False): Mosquitto 2.0.11 restores a resumed
        subscriber session after a restart but never re-sends the QoS 1 messages that
        were in flight to it, so the window stays full and nothing more is delivered; a
        clean session avoids that.
        Messages the broker held for the backend at the restart are the broker's.
        """
        ctx = self.tls or client_context(
            self.pki.ca_cert, self.pki.backend.cert, self.pki.backend.key
        )
        self.online = asyncio.Event()
        self._switched = asyncio.Event()
        tasks = [asyncio.create_task(self._run(ctx), name="cloud:collect")]
        reading = asyncio.Event()
        if self.jetstream is not None:
            self.reader = UplinkReader(self.jetstream, ctx, self.client_id, self._uplink_stored)
            tasks.append(
                asyncio.create_task(
                    self.reader.run_until_cancelled(reading), name="cloud:jetstream"
                )
            )
        else:
            reading.set()
        try:
            try:
                async with asyncio.timeout(CONNECT_WITHIN_S):
                    await self.online.wait()
                    await reading.wait()
            except TimeoutError:
                raise TransportError(
                    f"the backend could not connect to the broker at {self.host}:{self.port} "
                    f"within {CONNECT_WITHIN_S:g} s ({self._why_not_online()}); is "
                    "it running there, and does it trust the CA of --ca?"
                ) from None
            yield self
        finally:
            self._stopping = True
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Sends still waiting for a connection (sync answers, commands nobody awaits
            # any more) end with the cloud; each one's own caller hears of it.
            sends: list[asyncio.Future[Any]] = [*self._tasks]
            sends += [f for pending in self._issuing.values() for f in pending]
            for send in sends:
                send.cancel()
            await asyncio.gather(*sends, return_exceptions=True)

    def _why_not_online(self) -> str:
        if not self.online.is_set():
            return self.last_error or "no answer"
        reading = self.reader.last_error if self.reader is not None else None
        return f"its JetStream consumer: {reading or 'no answer'}"

    def _options(self, ctx: ssl.SSLContext) -> mqtt.Options:
        ports = (self.port, *self.fallback_ports)
        return mqtt.Options(
            host=self.host,
            port=ports[self._endpoint % len(ports)],
            tls=ctx,
            client_id=self.client_id,
            protocol=self.protocol,
            persistent=self.persistent,
            # The cloud issues commands to a whole fleet at once: with paho's default of
            # 20 in flight they queued behind each other's PUBACKs for many seconds.
            max_inflight=1000,
        )

    async def _run(self, ctx: ssl.SSLContext) -> None:
        while True:
            # A fresh client per connection: aiomqtt's is not reliably reusable after a
            # connection broke.
            try:
                async with mqtt.connect(self._options(ctx)) as conn:
                    self._switch(conn)
                    await self._subscribe(conn)
                    self.online.set()
                    self.online_at.append(self.clock())
                    self.connects += 1
                    await self._collect(conn)
            except TransportError as exc:
                if self._stopping:  # aiomqtt's disconnect can turn a cancel into this
                    raise asyncio.CancelledError from None
                self.last_error = str(exc)
                self.online.clear()
                self._switch(None)
                self._endpoint += 1
                await asyncio.sleep(0.02)

    def up_filters(self) -> list[str]:
        """What the backend subscribes to: every uplink, or, as a shard's consumer on a
        broker with clean sessions, only its own devices' (so the broker does not send
        every uplink once per shard). A persistent session keeps the one wildcard: NATS
        makes a JetStream consumer per filter. None where JetStream is read instead."""
        if self.jetstream is not None:
            return []
        if self.devices is None or self.persistent:
            return [UP_FILTER_ALL]
        return [up_filter(d) for d in sorted(self.devices)]

    async def _subscribe(self, conn: mqtt.Connection) -> None:
        filters = self.up_filters()
        for i in range(0, len(filters), SUBSCRIBE_BATCH):
            await conn.subscribe_many(
                filters[i : i + SUBSCRIBE_BATCH], qos=1, ack_within=OPERATION_TIMEOUT_S
            )

    async def _collect(self, conn: mqtt.Connection) -> None:
        async for message in conn.incoming():
            self._uplink(message.topic, message.payload or b"", None)

    def _uplink_stored(self, message: Uplink) -> None:
        self._uplink(message.topic, message.payload, message.stored_at)

    def _uplink(self, topic: str, payload: bytes, stored_at: float | None) -> None:
        """Record one uplink message (answer it, if it is a command sync)."""
        self.delivered_to_us += 1
        parts = topic.split("/")
        if self.devices is not None and (len(parts) < 3 or parts[2] not in self.devices):
            return  # another shard's device: its own backend consumer records it
        if len(parts) == 5 and parts[4] == "sync":  # the command sync, not data
            self.syncs_seen += 1
            if self.answer_syncs:
                self._answer(parts[2], payload)
            else:
                self.held_syncs.append((parts[2], payload))
        elif len(parts) == 5:  # smartmi/v1/{id}/up/{kind}
            self.received.append(Received(parts[2], parts[4], payload, self.clock(), stored_at))
        self._notify()

    def _notify(self) -> None:
        """Check the waiters of ``wait_for`` once the messages of this turn of the event
        loop are in (not once per message: a predicate may look at every device)."""
        if self._waiters and not self._checking:
            self._checking = True
            asyncio.get_running_loop().call_soon(self._check)

    def _check(self) -> None:
        self._checking = False
        for predicate, done in self._waiters:
            if not done.done() and predicate(self.received):
                done.set_result(None)

    async def wait_for(self, predicate: Callable[[list[Received]], bool]) -> list[Received]:
        """Wait until ``predicate(received)`` holds (callers bound it with asyncio.timeout)."""
        if predicate(self.received):
            return self.received
        entry = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        finally:
            self._waiters.remove(entry)
        return self.received

    def answer_held(self, index: int) -> None:
        """Answer a sync request that was held (``answer_syncs`` off), late."""
        self._answer(*self.held_syncs[index])

    def _answer(self, device_id: str, payload: bytes) -> None:
        """Answer a device's command sync behind every command issued to it before."""
        try:
            sync_id = json.loads(payload)["sync_id"]
        except (ValueError, KeyError, TypeError):
            return
        earlier = list(self._issuing.get(device_id, ()))

        async def answer() -> None:
            await asyncio.gather(*earlier, return_exceptions=True)
            doc = {"sync_id": sync_id, "now": rfc3339(self.clock())}
            with contextlib.suppress(TransportError, TimeoutError):
                await self.send_raw(device_id, "sync", json.dumps(doc).encode())
            self.syncs_answered += 1

        task = asyncio.create_task(answer(), name=f"cloud:sync:{device_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def issue(
        self, device_id: str, name: str, body: dict[str, Any]
    ) -> tuple[str, asyncio.Future[float]]:
        """Start sending a command (QoS 1) with a fresh command_id and issued_at: its id
        at once, and the send to await. A sync answer for the device waits until this
        command is with the broker."""
        command_id = str(body.get("command_id") or uuid.uuid4().hex)
        issued_at = body.get("issued_at") or rfc3339(self.clock())
        doc = {**body, "command_id": command_id, "issued_at": issued_at}
        self.issued.append((device_id, name, doc))
        sending = asyncio.ensure_future(self.send_raw(device_id, name, json.dumps(doc).encode()))
        pending = self._issuing.setdefault(device_id, set())
        pending.add(sending)
        sending.add_done_callback(pending.discard)
        return command_id, sending

    async def command(self, device_id: str, name: str, body: dict[str, Any]) -> str:
        """Send a command (see ``issue``) and wait until the broker has it; returns its id."""
        command_id, sending = self.issue(device_id, name, body)
        await sending
        return command_id

    async def send_raw(self, device_id: str, name: str, payload: bytes) -> float:
        """Publish raw bytes to a device's down/ topic at QoS 1 until the broker has them.

        A real cloud keeps a command until the broker takes it: when the connection
        breaks first (its node killed, the broker restarted), the same bytes go again on
        the next one, within ``SEND_WITHIN_S``. Returns when the first attempt that may
        have reached the broker began, the earliest the device can have heard it; an
        attempt the client took nothing of (``NotSent``) does not count.
        """
        topic = f"smartmi/v1/{device_id}/down/{name}"
        first: float | None = None
        async with asyncio.timeout(SEND_WITHIN_S):
            while True:
                await self.online.wait()
                conn = self._conn
                assert conn is not None  # noqa: S101  # online
                began = self.clock()
                try:
                    # A command's PUBACK may wait this long: 10,000 agents connecting in
                    # the same process keep the event loop busy for tens of seconds, and
                    # the client's default (its connect timeout, 15 s) ended the run.
                    # Connecting keeps that default, so a node that accepts TLS but never
                    # answers MQTT is left for the next one soon.
                    await conn.publish(topic, payload, qos=1, ack_within=OPERATION_TIMEOUT_S)
                except PublishRefused:
                    raise
                except NotSent:
                    pass
                except TransportError:
                    first = began if first is None else first
                else:
                    return began if first is None else first
                if conn is self._conn:  # not told yet that it went: wait (a while) until it is
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RESEND_AFTER_S):
                            await self._switched.wait()

    def _switch(self, conn: mqtt.Connection | None) -> None:
        self._conn = conn
        self._switched.set()
        self._switched = asyncio.Event()

    def of(self, device_id: str, kind: str | None = None) -> list[Received]:
        """What arrived from one device (optionally of one kind)."""
        return [r for r in self.received if r.device_id == device_id and kind in (None, r.kind)]
