"""Test clients that talk to the real broker: a raw TLS/MQTT probe and a paho v5 client.

The probe speaks just enough MQTT 3.1.1 (CONNECT / CONNACK, §3.1-§3.2) to tell
whether the broker let a TLS session through; the paho client shows the broker's
v5 reason codes for publishes and subscriptions.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.runtime.tls import client_context
from simulator.broker import LocalBroker
from simulator.pki import Identity

TIMEOUT = 10.0
ALERT_WAIT = 1.0  # how long a refusing broker gets to send its alert


def connect_packet(client_id: str = "probe") -> bytes:
    """An MQTT 3.1.1 CONNECT with clean session and a 60 s keep-alive."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    return bytes([0x10, len(body)]) + body


def raw_connect(ctx: ssl.SSLContext | None, host: str, port: int) -> bytes:
    """TLS handshake (if ``ctx``), send CONNECT, return the first bytes the broker answers.

    Returns b"" when the broker closes the connection; TLS alerts raise ssl.SSLError.
    """
    with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
        sock: socket.socket = ctx.wrap_socket(raw, server_hostname=host) if ctx else raw
        try:
            if ctx is not None:
                # Under TLS 1.3 the server checks our certificate after the client's side
                # of the handshake is done, and refuses with an alert. Read first: if we
                # wrote CONNECT into a connection the server already closed, the reset
                # could discard that alert before we see it.
                sock.settimeout(ALERT_WAIT)
                try:
                    return sock.recv(4)  # b"" (closed) or an alert (raises): refused
                except TimeoutError:
                    pass  # accepted: the broker is waiting for our CONNECT
                sock.settimeout(TIMEOUT)
            sock.sendall(connect_packet())
            return sock.recv(4)
        finally:
            sock.close()


def ctx_for(ca: Path, ident: Identity) -> ssl.SSLContext:
    """A client context with the project's own TLS settings."""
    return client_context(ca, ident.cert, ident.key)


@dataclass
class PahoClient:
    """A paho MQTT v5 client on its own network thread, with awaitable-by-event results."""

    broker: LocalBroker
    ca: Path
    ident: Identity
    client_id: str
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)
    _acks: dict[int, threading.Event] = field(default_factory=dict)
    _codes: dict[int, list[ReasonCode]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _connected: threading.Event = field(default_factory=threading.Event)
    connect_rc: ReasonCode | None = None

    def __post_init__(self) -> None:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self.protocol
        )
        c.tls_set_context(ctx_for(self.ca, self.ident))
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client = c

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connect_rc = rc
        self._connected.set()

    def _done(self, mid: int, codes: list[ReasonCode]) -> None:
        with self._lock:
            self._codes[mid] = codes
            ev = self._acks.setdefault(mid, threading.Event())
        ev.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._done(mid, [rc])

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        self._done(mid, rcs)

    def _wait(self, mid: int) -> list[ReasonCode]:
        with self._lock:
            ev = self._acks.setdefault(mid, threading.Event())
        assert ev.wait(TIMEOUT), f"no acknowledgement for mid {mid}"
        return self._codes[mid]

    def connect(self) -> ReasonCode:
        """Connect and wait for CONNACK."""
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT), "no CONNACK"
        assert self.connect_rc is not None
        return self.connect_rc

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=qos)
        return self._wait(info.mid)[0]

    def subscribe(self, topic: str, qos: int = 1) -> ReasonCode:
        """Subscribe and return the SUBACK reason code."""
        _rc, mid = self.client.subscribe(topic, qos=qos)
        assert mid is not None
        return self._wait(mid)[0]

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        """The next message delivered to this client."""
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
        # paho 2.2's loop_stop() leaves its wake-up socket pair open (a ResourceWarning,
        # an error under our warnings policy); its own reset closes it.
        self.client._reset_sockets()
