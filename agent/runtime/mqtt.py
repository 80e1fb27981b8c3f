"""The MQTT adapter: the one module that imports paho-mqtt or aiomqtt.

Everything else talks to the broker through ``connect`` and the ``Connection`` it
yields, and sees only our own types and the exception tree of ``agent.errors``:
paho's and aiomqtt's errors are translated here (``raise ... from``).

Read from paho-mqtt 2.2.0 and aiomqtt 2.5.1. Where this module leans on their
internals it says so at the line, and these are the only such places:

* aiomqtt's ``_on_publish`` is overridden to take every PUBACK with its reason code
  (aiomqtt's own ``publish`` drops it, and slows down as calls pile up), its
  ``_on_message`` to hand each incoming message to ``connect``'s ``on_message``
  as the socket is read (when one is given), its ``_disconnected`` future says
  why a connection broke, ends the waits for PUBACKs and is what
  ``Connection.ended`` awaits, its ``_queue`` of incoming messages is drained at
  once after each one its iterator gives, and its reader of the socket
  (``_on_socket_open``) is replaced by one that reads up to ``READ_BURST``
  packets while bytes wait (``Connection.read_waiting`` reads the same way);
* paho's ``_reset_sockets`` closes a socket that a failed handshake left open
  (paho has no public close);
* paho's public ``on_socket_register_write`` hook, which aiomqtt sets, is replaced
  by one that checks, when the loop gets to it, that the socket is still open and
  paho still has something to write: aiomqtt's own adds the writer later, when paho
  may already have written everything and dropped its registration, so the writer
  is never removed, spins, and outlives the socket (its file descriptor reused by
  another connection).

Nothing is ever taken back out of paho's queues. The transport hands paho a PUBLISH
only when paho has nothing left to write (``Connection.pending_write``) and has it
written at once (``Connection.flush``), so at most the last one can be held by a
full socket; if that one must not leave, ``Connection.abort`` ends the connection
before its last bytes are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import PublishRefused, TransportError
from agent.runtime.tls import classify_tls_error

# The versions this module was read from (its internals): pyproject.toml pins these.
READ_FROM: Final = {"aiomqtt": "2.5.1", "paho-mqtt": "2.2.0"}

# Packets read per wake-up of a socket, at most (aiomqtt's reader took one TLS record,
# often one packet, per round of the event loop). 4,096 for the simulated backend's one
# socket was no faster at 10,000 devices and slower in throughput.
READ_BURST = 64


@dataclass(frozen=True, slots=True)
class Options:
    """How to open one MQTT connection."""

    host: str
    port: int
    tls: ssl.SSLContext
    client_id: str
    protocol: Literal["v5", "v311"] = "v5"
    keepalive: int = 60
    connect_timeout: float = 15.0
    # Keep the broker-side session (queued commands) across connections; on v5 it
    # expires after this many seconds without a connection.
    persistent: bool = True
    session_expiry_s: int = 7 * 24 * 3600
    max_inflight: int = 20
    # Incoming QoS 1 messages are acknowledged when ``connect``'s ``on_message`` has
    # returned (their effect is durable), not by paho on receipt (SPEC §3).
    manual_ack: bool = False


@dataclass(frozen=True, slots=True)
class PubAck:
    """The broker's answer to one of our QoS 1 PUBLISHes (MQTT v5 §3.4.2.1)."""

    mid: int
    code: int
    reason: str

    @property
    def refused(self) -> bool:
        """A reason code of 0x80 or above is a refusal, never a success."""
        return self.code >= 0x80


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message the broker delivered to us."""

    topic: str
    payload: bytes | None
    mid: int = 0
    qos: int = 0


class LastErrorLog(logging.LoggerAdapter[logging.Logger]):
    """paho's log for one client; keeps its last error, which may name a TLS alert.

    When the broker refuses our certificate after a TLS 1.3 handshake, the alert
    arrives on paho's first read, and paho logs it rather than raising it.
    """

    def __init__(self, name: str, extra: dict[str, object]) -> None:
        super().__init__(logging.getLogger(name), extra)
        self.last_error: str | None = None

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            self.last_error = str(msg) % args if args else str(msg)
        elif not self.logger.isEnabledFor(level):
            return  # paho logs every packet at DEBUG: the cheapest way out
        super().log(level, msg, *args, **kwargs)


class _Client(aiomqtt.Client):
    """aiomqtt's client, with PUBACKs (and their reason codes) handled here.

    aiomqtt's own ``publish`` drops the reason code, and it counts every pending call
    on each publish (``len(list(...))``), which made a backend publishing to 10,000
    devices quadratic. A PUBACK goes to the future ``Connection.publish`` waits on,
    or else to ``on_puback``.
    """

    def __init__(
        self,
        *args: Any,
        on_puback: Callable[[PubAck], None] | None,
        on_message: Callable[[Incoming], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self._on_puback = on_puback
        self._handle = on_message
        self.manual_ack = False
        self.waiting: dict[int, asyncio.Future[PubAck]] = {}

    def _on_message(  # overrides aiomqtt 2.5.1's private callback, see the module docstring
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        if self._handle is None:
            super()._on_message(client, userdata, message)  # to aiomqtt's queue
            return
        # Handled here, inside paho's read of the socket: nothing waits in a queue. An
        # exception leaves the message unacknowledged and ends the connection.
        incoming = _incoming_paho(message)
        self._handle(incoming)
        if incoming.qos > 0 and self.manual_ack:
            client.ack(incoming.mid, incoming.qos)

    def read_socket(self, fd: int, readable: bool = False) -> None:
        """Read the packets waiting on socket ``fd`` (at most ``READ_BURST``), here and
        now; ``readable``: the loop says there is something (TLS may still need more)."""
        broke = self._disconnected
        try:
            for n in range(READ_BURST):
                if broke.done() or not (
                    (readable and n == 0) or _more_to_read(self._client.socket(), fd)
                ):
                    return
                self._client.loop_read()
        except Exception as exc:  # noqa: BLE001  # any failure here ends the connection
            if not broke.done():
                broke.set_exception(exc)

    def _on_publish(  # overrides aiomqtt 2.5.1's private callback, see the module docstring
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        ack = PubAck(mid, int(reason_code.value), str(reason_code))
        waiter = self.waiting.pop(mid, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(ack)
        elif self._on_puback is not None:
            self._on_puback(ack)

    def _on_socket_open(  # extends aiomqtt 2.5.1's private callback, see the module docstring
        self, client: paho.Client, userdata: Any, sock: Any
    ) -> None:
        super()._on_socket_open(client, userdata, sock)  # schedules its reader, then ours
        fd = sock.fileno()
        # Replaces aiomqtt's reader for this socket (added in the same order, just before).
        self._loop.call_soon_threadsafe(self._loop.add_reader, fd, self.read_socket, fd, True)

    def fail_waiting(self, broke: object = None) -> None:
        """The connection ended: no PUBACK will come for what is waiting.

        Why it ended is taken here too: ``Connection.ended`` may have stopped waiting for
        it (a stop), and asyncio would then print the exception as never retrieved.
        """
        if isinstance(broke, asyncio.Future) and not broke.cancelled():
            broke.exception()
        waiting, self.waiting = self.waiting, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(TransportError("the connection ended before the PUBACK"))


def _incoming(message: aiomqtt.Message) -> Incoming:
    payload = message.payload
    return Incoming(
        message.topic.value,
        bytes(payload) if isinstance(payload, bytes | bytearray) else None,
        message.mid,
        message.qos,
    )


def _incoming_paho(message: paho.MQTTMessage) -> Incoming:
    try:
        topic = message.topic
    except UnicodeDecodeError:
        topic = ""  # not a topic of ours: the handler refuses it
    return Incoming(topic, bytes(message.payload), message.mid, message.qos)


@functools.lru_cache(maxsize=4)
def _connect_properties(session_expiry_s: int) -> Properties:
    """CONNECT's properties, one object for every connection with the same expiry: paho
    only reads them, and each Properties builds a table of its own (2 KiB a device)."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return props


def _more_to_read(sock: Any, fd: int) -> bool:
    """Whether the socket (still ``fd``) holds more bytes, decrypted or not, right now."""
    if not isinstance(sock, socket.socket) or sock.fileno() != fd:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:  # the raw socket's recv: TLS bytes not yet decrypted count too
        return bool(socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing now (EAGAIN), or an error paho's next read reports
        return False


def _translate(exc: BaseException, logged: str | None = None) -> TransportError:
    """Map an aiomqtt/paho/ssl failure to our error tree."""
    if isinstance(exc, TransportError):
        return exc
    problem = classify_tls_error(Exception(logged or "")) or classify_tls_error(exc)
    if problem is not None:
        return problem
    return TransportError(f"{type(exc).__name__}: {exc}")


class Connection:
    """One open MQTT connection."""

    def __init__(self, client: _Client, ack_within: float) -> None:
        self._client = client
        self._paho: paho.Client = client._client  # aiomqtt 2.5.1 keeps paho's client here
        self._ack_within = ack_within

    async def subscribe(
        self, topic_filter: str, qos: int = 1, *, ack_within: float | None = None
    ) -> None:
        """Subscribe and wait up to ``ack_within`` s for the SUBACK (the client's
        timeout by default); a refused subscription is a TransportError."""
        await self.subscribe_many([topic_filter], qos, ack_within=ack_within)

    async def subscribe_many(
        self, topic_filters: list[str], qos: int = 1, *, ack_within: float | None = None
    ) -> None:
        """Subscribe to several filters in one SUBSCRIBE, waiting for its SUBACK.

        A filter the broker refused (a SUBACK code of 0x80 or above: not authorised, or
        a clustered broker that could not set it up) is a TransportError, so the caller
        connects again instead of waiting, subscribed to nothing, for what never comes.
        """
        codes = await self._client.subscribe([(f, qos) for f in topic_filters], timeout=ack_within)
        refused = [
            f"{f} ({code})" for f, code in zip(topic_filters, codes, strict=False) if _refused(code)
        ]
        if refused:
            raise TransportError(f"the broker refused the subscription to {', '.join(refused)}")

    def publish_nowait(self, topic: str, payload: bytes) -> int:
        """Hand a QoS 1 PUBLISH to the client; its PUBACK comes to ``on_puback``."""
        info = self._paho.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise TransportError(f"could not publish: {paho.error_string(info.rc)}")
        return int(info.mid)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, *, ack_within: float | None = None
    ) -> None:
        """Publish and wait until the broker has it, up to ``ack_within`` s (the
        connect timeout by default); a refusing PUBACK raises ``PublishRefused``."""
        info = self._paho.publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise TransportError(f"could not publish: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._client.waiting[info.mid] = waiter
        try:
            async with asyncio.timeout(ack_within or self._ack_within):
                ack = await waiter
        except TimeoutError:
            raise TransportError(f"no PUBACK for {topic} within the time allowed") from None
        finally:
            self._client.waiting.pop(info.mid, None)
        if ack.refused:
            raise PublishRefused(topic, ack.code, ack.reason)

    async def incoming(self) -> AsyncIterator[Incoming]:
        """Every message the broker delivers, in order, until the connection ends.

        aiomqtt's iterator makes a task and waits a round of the event loop for every
        message; after each, what has already arrived is taken at once. A backend
        consumer in a loop shared with 10,000 agents read one message per round that
        way, about 300 a second, and fell a minute behind its broker.
        """
        queue: asyncio.Queue[aiomqtt.Message] = self._client._queue  # aiomqtt 2.5.1
        messages = self._client.messages
        while True:
            message: aiomqtt.Message | None = await anext(messages)
            while message is not None:
                incoming = _incoming(message)
                # Nothing of paho's is held while the caller has the message (or waits
                # for the next): its properties cost 2 KiB a device.
                message = None
                yield incoming
                try:
                    message = queue.get_nowait()
                except asyncio.QueueEmpty:
                    message = None

    def read_waiting(self) -> None:
        """Read and handle (``on_message``) the messages already on the socket, now."""
        sock = self._paho.socket()
        if isinstance(sock, socket.socket):
            self._client.read_socket(sock.fileno())

    @property
    def broken(self) -> bool:
        """Whether the connection has ended (its end not yet reported)."""
        return self._client._disconnected.done()  # aiomqtt 2.5.1

    async def ended(self) -> None:
        """Wait until the connection ends; raise why (a TransportError at the block's end)."""
        # shield: a cancelled waiter must not cancel aiomqtt 2.5.1's own future.
        await asyncio.shield(self._client._disconnected)
        raise TransportError("the connection ended")

    def pending_write(self) -> bool:
        """Whether paho still holds bytes it has not written to the socket."""
        return bool(self._paho.want_write())

    def flush(self) -> None:
        """Write what paho holds now, as far as the socket takes it."""
        self._paho.loop_write()

    def abort(self) -> None:
        """End the connection at once: what paho has not written never leaves.

        The socket is shut down under paho; paho then sees the connection end and
        aiomqtt reports it, so the session ends the usual way.
        """
        sock = self._paho.socket()
        if not isinstance(sock, socket.socket):  # ssl.SSLSocket is one
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _refused(code: object) -> bool:
    """Whether a SUBACK code refuses the filter (0x80 or above, either protocol)."""
    if isinstance(code, ReasonCode):
        return bool(code.is_failure)
    return isinstance(code, int) and code >= 0x80


def _why_it_ended(
    client: aiomqtt.Client, group: BaseExceptionGroup[Exception], logged: str | None
) -> TransportError:
    """The one TransportError that says why a connection ended."""
    # aiomqtt 2.5.1 keeps why the connection broke on a private future.
    broke = client._disconnected
    cause = broke.exception() if broke.done() and not broke.cancelled() else None
    mqtt_errors = [e for e in group.exceptions if isinstance(e, aiomqtt.MqttError)]
    if cause is not None or mqtt_errors:
        return _translate(cause or mqtt_errors[0], logged)
    return _translate(group.exceptions[0])


def _register_write_safely(
    client: aiomqtt.Client, on_writable: Callable[[], None] | None = None
) -> None:
    """paho asks for a writer when it has bytes to write; add it only for a live socket.
    ``on_writable`` hears when the writer has written everything paho held."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    broke = client._disconnected  # aiomqtt 2.5.1: the future that ends the connection

    def register(c: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()

        def write() -> None:
            try:
                c.loop_write()
            except Exception as exc:  # noqa: BLE001  # any failure here ends the connection
                if not broke.done():
                    broke.set_exception(exc)
                return
            if on_writable is not None and not c.want_write():
                on_writable()

        def add() -> None:
            # Not closed (nor reused) meanwhile, and still something to write: the
            # transport writes at once, so paho has often written it all and dropped
            # its registration before this runs. A writer added then would never be
            # removed (paho thinks none is registered) and would outlive the socket.
            if fd >= 0 and sock.fileno() == fd and c.want_write():
                loop.add_writer(fd, write)

        if threading.get_ident() == loop_thread:
            loop.call_soon(add)  # no wake-up byte through the loop's self-pipe
        else:
            loop.call_soon_threadsafe(add)  # paho calls this from aiomqtt's connect thread

    client._client.on_socket_register_write = register


@contextlib.asynccontextmanager
async def connect(
    options: Options,
    *,
    on_puback: Callable[[PubAck], None] | None = None,
    on_message: Callable[[Incoming], None] | None = None,
    on_writable: Callable[[], None] | None = None,
    logger: LastErrorLog | None = None,
) -> AsyncIterator[Connection]:
    """Open a connection for the duration of the block; every failure is a TransportError.

    With ``on_puback`` every PUBACK goes to it and ``Connection.publish_nowait`` is
    the way to publish; without it ``Connection.publish`` waits for each PUBACK.
    With ``on_message`` every incoming message is handled by it as the socket is read
    (and acknowledged when it returns, with ``Options.manual_ack``); without it they
    wait for ``Connection.incoming``. ``on_writable`` is called when the socket took
    the last bytes paho held (``Connection.pending_write`` turned false): one who
    waits for room awaits it instead of looking again and again.
    """
    o = options
    v5 = o.protocol == "v5"
    props = _connect_properties(o.session_expiry_s) if v5 and o.persistent else None
    log = logger or LastErrorLog("smartmi.mqtt", {"client": o.client_id})
    kwargs: dict[str, Any] = {
        "identifier": o.client_id,
        "protocol": aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        # v5: clean start off resumes the broker-side session; paho refuses the option
        # on 3.1.1, where clean_session=False does the same.
        "clean_session": None if v5 else not o.persistent,
        "clean_start": (not o.persistent) if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        "logger": log,  # a LoggerAdapter: paho and aiomqtt only call .log and friends
        "properties": props,
        "keepalive": o.keepalive,
        "tls_context": o.tls,
        "timeout": o.connect_timeout,
        "max_inflight_messages": o.max_inflight,
    }
    client = _Client(o.host, o.port, on_puback=on_puback, on_message=on_message, **kwargs)
    _register_write_safely(client, on_writable)
    if o.manual_ack:
        # paho's public setter, reached through aiomqtt 2.5.1's private client attribute.
        client._client.manual_ack_set(True)
        client.manual_ack = True
    try:
        async with client:
            # aiomqtt 2.5.1 sets this future when the connection breaks.
            client._disconnected.add_done_callback(client.fail_waiting)
            yield Connection(client, o.connect_timeout)
    except* (aiomqtt.MqttError, OSError, ssl.SSLError, TransportError) as group:
        # One error out, whatever the caller's tasks raised together as the link broke.
        raise _why_it_ended(client, group, log.last_error) from None
    finally:
        # A connection that failed half-way (a refused certificate, a timeout) leaves
        # paho's socket open; close it and its wake-up pair now (paho 2.2.0 internals).
        client._client._reset_sockets()
