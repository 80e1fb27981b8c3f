"""The transport's view of a broker connection: what it asks of one, and how one opens.

``Link`` is the part of a connection the transport and the command sync use, and
``Connector`` the function that opens one for the duration of a block. The MQTT
adapter's ``connect`` and its ``Connection`` are the real ones
(``agent.runtime.mqtt``); a test gives the transport a fake connector instead and
drives it with no socket, as httpcore's mock backend stands in for the network.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from agent.runtime import mqtt


class Link(Protocol):
    """One open connection, as the transport uses it (``mqtt.Connection`` is one)."""

    @property
    def broken(self) -> bool:
        """Whether the connection has ended (its end not yet reported)."""

    async def subscribe(
        self, topic_filter: str, qos: int = 1, *, ack_within: float | None = None
    ) -> None:
        """Subscribe and wait for the SUBACK; a refused subscription is a TransportError."""

    def publish_nowait(self, topic: str, payload: bytes) -> int:
        """Hand a QoS 1 PUBLISH over and return its packet id; its PUBACK comes later."""

    def flush(self) -> None:
        """Write what is held now, as far as the socket takes it."""

    def pending_write(self) -> bool:
        """Whether bytes are held that have not been written yet."""

    def read_waiting(self) -> None:
        """Read and handle the messages already waiting, now."""

    async def ended(self) -> None:
        """Wait until the connection ends; raise why."""

    def abort(self) -> None:
        """End the connection at once: what has not been written never leaves."""


class Connector(Protocol):
    """Opens a connection for the duration of a block (``mqtt.connect`` is one)."""

    def __call__(
        self,
        options: mqtt.Options,
        *,
        on_puback: Callable[[mqtt.PubAck], None] | None = None,
        on_message: Callable[[mqtt.Incoming], None] | None = None,
        on_writable: Callable[[], None] | None = None,
        logger: mqtt.LastErrorLog | None = None,
    ) -> AbstractAsyncContextManager[Link]:
        """Connect with ``options``; PUBACKs go to ``on_puback``, messages to ``on_message``."""
