"""Where a device connects, and how: the broker's addresses and the session it keeps there.

``BrokerTarget`` is what the daemon and the simulator know of a broker: its address
(and, for a cluster, the other nodes'), the device's TLS context and the protocol.
``BrokerTarget.options`` adds what every device connection asks of the broker, so
that commands reach the device as SPEC §3 promises: a persistent session that keeps
commands sent while the device was offline, and acknowledgements of commands left to
the device, which sends one once the command's effect is durable.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal

from agent.runtime import mqtt

SESSION_EXPIRY_S = 7 * 24 * 3600  # keep commands queued for a device offline up to a week


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

    def options(self, endpoint: int, client_id: str, max_inflight: int) -> mqtt.Options:
        """The adapter's options for the ``endpoint``-th address (counted round), as
        ``client_id`` with at most ``max_inflight`` PUBLISHes awaiting their PUBACK."""
        host, port = self.endpoints[endpoint % len(self.endpoints)]
        return mqtt.Options(
            host=host,
            port=port,
            tls=self.tls,
            client_id=client_id,
            protocol=self.protocol,
            keepalive=self.keepalive,
            connect_timeout=self.connect_timeout,
            persistent=True,  # commands sent while the device was offline arrive
            session_expiry_s=SESSION_EXPIRY_S,
            max_inflight=max_inflight,
            manual_ack=True,  # a command is acknowledged once its effect is durable
        )
