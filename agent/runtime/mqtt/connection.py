"""One open MQTT connection, for the duration of ``connect``'s block.

``connect`` builds the client (``agent.runtime.mqtt.client``) from the caller's
``Options`` (``agent.runtime.mqtt.options``), and the ``Connection`` it yields is how
the rest of the agent publishes, subscribes and reads. Every failure of paho, aiomqtt
or ssl leaves it as a TransportError (``raise ... from``).

Nothing is ever taken back out of paho's queues. The transport hands paho a PUBLISH
only when paho has nothing left to write (``Connection.pending_write``) and has it
written at once (``Connection.flush``), so at most the last one can be held by a
full socket; if that one must not leave, ``Connection.abort`` ends the connection
before its last bytes are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import NotSent, PublishRefused, TransportError
from agent.runtime.mqtt.client import Client, Incoming, PubAck, register_write_safely
from agent.runtime.mqtt.options import LastErrorLog, Options, client_arguments
from agent.runtime.tls import classify_tls_error


def _incoming(message: aiomqtt.Message) -> Incoming:
    payload = message.payload
    return Incoming(
        message.topic.value,
        bytes(payload) if isinstance(payload, bytes | bytearray) else None,
        message.mid,
        message.qos,
    )


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

    def __init__(self, client: Client, ack_within: float) -> None:
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
            raise NotSent(f"could not publish: {paho.error_string(info.rc)}")
        return int(info.mid)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, *, ack_within: float | None = None
    ) -> None:
        """Publish and wait until the broker has it, up to ``ack_within`` s (the
        connect timeout by default); a refusing PUBACK raises ``PublishRefused``."""
        info = self._paho.publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise NotSent(f"could not publish: {paho.error_string(info.rc)}")
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
    log = logger or LastErrorLog("smartmi.mqtt", {"client": o.client_id})
    client = Client(
        o.host, o.port, on_puback=on_puback, on_message=on_message, **client_arguments(o, log)
    )
    register_write_safely(client, on_writable)
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
