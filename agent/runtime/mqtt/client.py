"""aiomqtt's client as the adapter runs it: PUBACKs with their reason codes, messages
handled as the socket is read, and a writer registered only for a live socket.

The places where it leans on aiomqtt's and paho's internals are listed in the
package's docstring (``agent.runtime.mqtt``); each says so at the line.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import TransportError

# Packets read per wake-up of a socket, at most (aiomqtt's reader took one TLS record,
# often one packet, per round of the event loop). 4,096 for the simulated backend's one
# socket was no faster at 10,000 devices and slower in throughput.
READ_BURST = 64


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


class _NoQueue:
    """aiomqtt's incoming-message queue for a client whose messages are handled as the
    socket is read (``Client._on_message``): none is ever queued, so nothing is kept."""

    __slots__ = ()

    def __init__(self, maxsize: int = 0) -> None:
        del maxsize

    def qsize(self) -> int:
        return 0

    def put_nowait(self, message: object) -> None:
        raise TransportError("a message reached aiomqtt's queue; it has its own handler")

    async def get(self) -> aiomqtt.Message:
        raise TransportError("this client's messages go to its handler, not a queue")


class Client(aiomqtt.Client):
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
        if on_message is not None:  # aiomqtt's queue (three deques, 2.2 KiB) stays empty
            kw.setdefault("queue_type", _NoQueue)
        super().__init__(*args, **kw)
        self._on_puback = on_puback
        self._handle = on_message
        self.manual_ack = False
        self.waiting: dict[int, asyncio.Future[PubAck]] = {}

    def _on_message(  # overrides aiomqtt 2.5.1's private callback, see the package docstring
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

    def _on_publish(  # overrides aiomqtt 2.5.1's private callback, see the package docstring
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

    def _on_socket_open(  # extends aiomqtt 2.5.1's private callback, see the package docstring
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


def _incoming_paho(message: paho.MQTTMessage) -> Incoming:
    try:
        topic = message.topic
    except UnicodeDecodeError:
        topic = ""  # not a topic of ours: the handler refuses it
    return Incoming(topic, bytes(message.payload), message.mid, message.qos)


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


def register_write_safely(
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
