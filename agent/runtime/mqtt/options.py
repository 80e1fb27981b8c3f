"""How the adapter opens a connection: our ``Options``, paho's log, and aiomqtt's arguments.

``client_arguments`` turns ``Options`` into what aiomqtt's client takes (the protocol,
the persistent session, the TLS context, the flow-control window); the connection
itself is ``agent.runtime.mqtt.connection``.
"""

from __future__ import annotations

import functools
import logging
import ssl
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


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


@functools.lru_cache(maxsize=4)
def _connect_properties(session_expiry_s: int) -> Properties:
    """CONNECT's properties, one object for every connection with the same expiry: paho
    only reads them, and each Properties builds a table of its own (2 KiB a device)."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return props


def client_arguments(options: Options, log: LastErrorLog) -> dict[str, Any]:
    """aiomqtt's client arguments (besides the address) for ``options``, logging to ``log``."""
    o = options
    v5 = o.protocol == "v5"
    props = _connect_properties(o.session_expiry_s) if v5 and o.persistent else None
    return {
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
