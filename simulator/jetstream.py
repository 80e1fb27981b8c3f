"""The backend reads a NATS cluster's uplink from JetStream, not over MQTT (SPEC §4, §5).

NATS stores every QoS 1 message an MQTT client publishes in the stream ``$MQTT_msgs``
(subject ``$MQTT.msgs.<topic with '.' for '/'>``) before it sends the PUBACK, and keeps
it while a consumer still wants it (interest retention). The simulated cloud reads
the fleet's ``up/`` there through one durable pull consumer of its own, replicated
like the stream, in batches, with several workers: what NATS's MQTT layer would give
one MQTT subscription (a consumer with at most ``max_ack_pending`` unacknowledged,
through one session) becomes a queue any number of workers drain.

Each message carries the time the broker stored it (its JetStream timestamp): when
it had left the device, by the broker's clock, which the checker takes as departure.
Commands still go down over MQTT, to each device's own subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JsError

from agent.errors import TransportError

STREAM: Final = "$MQTT_msgs"
_PREFIX: Final = "$MQTT.msgs."
UP_SUBJECT: Final = _PREFIX + "smartmi.v1.*.up.>"
# Messages one fetch asks for, and fetches in flight at once: a worker records and
# acknowledges its batch while the others wait on the next.
BATCH: Final = 500
WORKERS: Final = 4
# Unacknowledged messages the consumer may have out: every worker's batch, twice.
MAX_ACK_PENDING: Final = 2 * BATCH * WORKERS
# A message fetched and not acknowledged within this is delivered again (the worker
# holding it died with its connection); the checker counts the duplicate by msg_id.
ACK_WAIT_S: Final = 30.0
# How long a fetch that found nothing waiting lingers for more. nats-py returns such a
# fetch only when its batch is full or this has passed, so it is also the most a
# message that finds the consumer idle waits in the backend: 1 s gave a p50 of 3.5 s
# from capture to backend at 1,000 agents (a sync, then the data, each waiting).
_FETCH_WAIT_S: Final = 0.1
_INBOX: Final = "_INBOX_smartmi_backend"


def inbox_prefix(durable: str) -> str:
    """Where a backend's JetStream replies come: its own, so the ACL can name it."""
    return f"{_INBOX}.{durable}"


def backend_permissions(durable: str) -> tuple[list[str], list[str]]:
    """What a backend identity may publish and subscribe to on the NATS port: its own
    consumer's API, fetches and acknowledgements, and replies to its own inbox."""
    publish = [
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{durable}.>",
        f"$JS.API.CONSUMER.INFO.{STREAM}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}",
        f"$JS.ACK.{STREAM}.{durable}.>",
    ]
    return publish, [f"{inbox_prefix(durable)}.>"]


def topic_of(subject: str) -> str:
    """The MQTT topic of a ``$MQTT_msgs`` subject (device IDs carry no '.')."""
    return subject.removeprefix(_PREFIX).replace(".", "/")


class _EofOverTls(logging.Filter):
    """nats-py's protocol answers a TLS connection's end with ``True`` from
    ``eof_received``, which asyncio reports as a warning at every close: harmless (the
    connection closes all the same), and noise on a user's terminal."""

    NOTICE = "returning true from eof_received() has no effect when using ssl"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.NOTICE


_ASYNCIO_LOG = logging.getLogger("asyncio")
if not any(isinstance(f, _EofOverTls) for f in _ASYNCIO_LOG.filters):
    _ASYNCIO_LOG.addFilter(_EofOverTls())


def replicas_for(nodes: int) -> int:
    """On how many of a cluster's nodes JetStream keeps each stream: all, up to three
    (``stream_replicas`` in broker-config/nats-server.conf)."""
    return min(nodes, 3)


@dataclass(frozen=True, slots=True)
class JetStreamAt:
    """Where a NATS cluster's JetStream is: every node's NATS port."""

    urls: tuple[str, ...]  # tls://host:port

    @property
    def replicas(self) -> int:
        """On how many nodes the backend's consumer is kept: as many as keep the stream."""
        return replicas_for(len(self.urls))


@dataclass(frozen=True, slots=True)
class Uplink:
    """One message from the stream: its MQTT topic, payload, and when NATS stored it."""

    topic: str
    payload: bytes
    stored_at: float  # the broker's clock, seconds since the epoch


@dataclass
class UplinkReader:
    """A durable pull consumer over the fleet's ``up/``, drained by ``workers``."""

    at: JetStreamAt
    tls: ssl.SSLContext
    durable: str
    on_message: Callable[[Uplink], None]
    workers: int = WORKERS
    batch: int = BATCH
    last_error: str | None = None
    _stopping: bool = False
    # The consumer exists (created by this reader or before it). It is durable and
    # replicated like the stream, so a reconnect binds to it without asking the
    # JetStream API, which a cluster that just lost a node may not answer for tens of
    # seconds (seen: 10 s timeouts for 50 s in the twenty-kills loop).
    _created: bool = False

    async def run_until_cancelled(self, ready: asyncio.Event) -> None:
        """``run``, and again after a failure (the consumer is durable: nothing it held
        is lost), until cancelled."""
        while True:
            try:
                await self.run(ready)
            except TransportError as exc:
                self.last_error = str(exc)
                await asyncio.sleep(0.5)

    async def run(self, ready: asyncio.Event) -> None:
        """Connect to any node, make sure the consumer exists, set ``ready``, and drain
        until cancelled or the connection is lost (a TransportError).

        Reconnecting is ours, with a new client each time, not nats-py's: its own
        reconnect drops a connection that failed half-way (a node killed during the TLS
        upgrade) without closing it, and a fresh client closes what it opened."""
        self._stopping = False
        nc = NATS()
        try:
            await nc.connect(
                servers=list(self.at.urls),
                tls=self.tls,
                inbox_prefix=inbox_prefix(self.durable),
                name=self.durable,
                connect_timeout=10,
                allow_reconnect=False,
                reconnect_time_wait=1,
                max_reconnect_attempts=2,
                error_cb=self._error,
            )
        except BaseException as exc:  # a cancel too: nats-py leaves a first attempt open
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.close()
            if isinstance(exc, OSError | NatsError | TimeoutError):
                raise TransportError(f"the backend could not reach JetStream: {exc}") from exc
            raise
        try:
            js = nc.jetstream(timeout=10)
            if not self._created:
                await self._create(js)
            subs = [
                await js.pull_subscribe_bind(self.durable, stream=STREAM)
                for _ in range(self.workers)
            ]
            ready.set()
            workers = [
                asyncio.create_task(self._drain(nc, sub), name=f"cloud:jetstream:{i}")
                for i, sub in enumerate(subs)
            ]
            try:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a worker that ended has failed: raise why
            finally:
                await self._stop(workers)
        except (NatsError, JsError) as exc:
            raise TransportError(f"the backend's JetStream consumer failed: {exc}") from exc
        finally:
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.close()

    async def _create(self, js: JetStreamContext) -> None:
        """Make sure the durable consumer exists (an existing one is left as it is)."""
        await js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=self.durable,
                filter_subject=UP_SUBJECT,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ACK_WAIT_S,
                max_ack_pending=MAX_ACK_PENDING,
                max_waiting=4 * self.workers,
                num_replicas=self.at.replicas,
            ),
        )
        self._created = True

    async def _drain(self, nc: NATS, sub: JetStreamContext.PullSubscription) -> None:
        while not self._stopping:
            if nc.is_closed:
                raise TransportError(f"the connection to JetStream was lost ({self.last_error})")
            try:
                msgs = await sub.fetch(self.batch, timeout=_FETCH_WAIT_S)
            except TimeoutError:
                continue  # nothing waiting: ask again
            except NatsError as exc:  # the connection ends, or a request failed
                self.last_error = str(exc)
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                stored = msg.metadata.timestamp.timestamp()
                self.on_message(Uplink(topic_of(msg.subject), msg.data, stored))
                # Recorded first: a message lost with the process is delivered again.
                with contextlib.suppress(NatsError):
                    await msg.ack()

    async def _stop(self, workers: list[asyncio.Task[None]]) -> None:
        """End the workers: each stops at its next fetch. Python 3.11's
        ``asyncio.wait_for``, inside nats-py's fetch, can swallow a cancellation, and a
        worker whose cancel was lost has been seen to hold a fleet's end for minutes;
        so the workers are also told to stop, and waited for a bounded time (a fetch
        lingers at most _FETCH_WAIT_S)."""
        self._stopping = True
        for task in workers:
            task.cancel()
        await asyncio.wait(workers, timeout=5.0)

    async def _error(self, exc: Exception) -> None:
        self.last_error = str(exc)
