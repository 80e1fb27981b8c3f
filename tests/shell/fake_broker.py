"""A broker with no socket, for driving a ``Transport`` through its public surface.

``FakeBroker`` is a ``Connector`` (``agent.runtime.link``): given to a transport, it
opens a ``FakeLink`` for each connection instead of the MQTT adapter's. The link keeps
every PUBLISH the transport hands it, and the test answers as a broker would: a
PUBACK with a reason code, or a message on one of the device's ``down/`` topics.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from agent.errors import TransportError
from agent.runtime import mqtt


class FakeLink:
    """One connection: every PUBLISH is written at once and kept, nothing is sent."""

    def __init__(
        self,
        on_puback: Callable[[mqtt.PubAck], None] | None,
        on_message: Callable[[mqtt.Incoming], None] | None,
    ) -> None:
        self._on_puback = on_puback
        self._on_message = on_message
        self.subscribed: list[str] = []
        self.published: list[tuple[int, str, bytes]] = []  # (mid, topic, payload)
        self._changed = asyncio.Event()
        self._end = asyncio.Event()

    # -- what the transport calls (Link) -------------------------------------------
    @property
    def broken(self) -> bool:
        """Whether ``abort`` ended it."""
        return self._end.is_set()

    async def subscribe(
        self, topic_filter: str, qos: int = 1, *, ack_within: float | None = None
    ) -> None:
        """Granted at once."""
        self.subscribed.append(topic_filter)

    def publish_nowait(self, topic: str, payload: bytes) -> int:
        """Keep the PUBLISH; its PUBACK waits for ``puback``."""
        mid = len(self.published) + 1
        self.published.append((mid, topic, payload))
        self._changed.set()
        return mid

    def flush(self) -> None:
        """Everything is written already."""

    def pending_write(self) -> bool:
        """Never anything left to write."""
        return False

    def read_waiting(self) -> None:
        """Messages are delivered by ``deliver``, at once: none wait."""

    async def ended(self) -> None:
        """Wait until ``abort``; raise as the adapter does."""
        await self._end.wait()
        raise TransportError("the connection ended")

    def abort(self) -> None:
        """End the connection."""
        self._end.set()

    # -- what the test calls, as the broker ------------------------------------------
    async def publish_to(self, topic: str) -> tuple[int, bytes]:
        """The first PUBLISH to ``topic`` (mid, payload), once the transport handed it over."""
        while True:
            for mid, to, payload in self.published:
                if to == topic:
                    return mid, payload
            self._changed.clear()
            await self._changed.wait()

    def puback(self, mid: int, code: int = 0, reason: str = "Success") -> None:
        """The broker's PUBACK for ``mid``."""
        assert self._on_puback is not None
        self._on_puback(mqtt.PubAck(mid, code, reason))

    def deliver(self, topic: str, payload: bytes) -> None:
        """A QoS 1 message from the cloud, read from the socket."""
        assert self._on_message is not None
        self._on_message(mqtt.Incoming(topic, payload, mid=1, qos=1))


class FakeBroker:
    """Opens a ``FakeLink`` per connection (a ``Connector``)."""

    def __init__(self) -> None:
        self.links: list[FakeLink] = []
        self._opened = asyncio.Event()

    @contextlib.asynccontextmanager
    async def __call__(
        self,
        options: mqtt.Options,
        *,
        on_puback: Callable[[mqtt.PubAck], None] | None = None,
        on_message: Callable[[mqtt.Incoming], None] | None = None,
        on_writable: Callable[[], None] | None = None,
        logger: mqtt.LastErrorLog | None = None,
    ) -> AsyncIterator[FakeLink]:
        """Connect at once."""
        link = FakeLink(on_puback, on_message)
        self.links.append(link)
        self._opened.set()
        yield link

    async def connection(self) -> FakeLink:
        """The first connection, once the transport opened it."""
        await self._opened.wait()
        return self.links[0]
