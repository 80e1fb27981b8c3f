"""Commands from the cloud on one device's connections: the command sync, then each command.

``agent.runtime.transport`` runs the connection and hands the outbox over; this
module takes what the cloud sends on the device's ``down/`` topics, and asks for it:

* **Commands first** (SPEC §3). After every (re)connect, once subscribed, ``sync``
  sends a sync request on ``up/sync``; the cloud answers on ``down/sync`` after every
  command it issued before, so the broker delivers the answer behind them. Until the
  answer arrives ``synced`` stays clear and the transport hands over only deletion
  requests. Without an answer (a bare broker with no cloud behind it) the request is
  repeated with backoff (``SYNC_RETRY``), and ``status`` says so. The answer's ``now``
  is the cloud's clock, which the device compares its own with (``Clock.from_sync``).
* **Taken as the socket is read.** ``on_message`` is the adapter's ``on_message``:
  a command is taken while paho reads it, never queued, and the transport reads what
  waits on the socket before each hand-over, so a narrowing choice on its way in
  covers what was captured meanwhile.
* **Acknowledged after it takes effect.** The adapter acknowledges a command when
  ``on_message`` has returned: after ``Device.take`` made its effect durable, or
  refused the command for good. An effect that cannot be written raises
  TransportError out of ``on_message``: not acknowledged, the connection ends, and the
  broker delivers the command again.

What this module needs of the transport is its connection (to send sync requests),
its counters and a way to wake its drain loop (``wake``): something may have become
sendable after a command or a sync answer.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from agent.core import backoff
from agent.core.commands import parse, parse_sync
from agent.core.identity import down_filter, up_topic
from agent.core.ordering import Clock
from agent.core.purposes import parse_rfc3339, rfc3339
from agent.device import Device
from agent.errors import AgentError, CommandRejected, TransportError
from agent.runtime import mqtt
from agent.runtime.link import Link
from agent.runtime.waits import Flag, wait_at_most

# The transport's logger: a command's lines sit among its connection's.
log = logging.getLogger("smartmi.transport")

# The command sync is repeated while no answer comes: after 10-15 s, then doubling to
# 5 min. Both the request and the answer are QoS 1 on persistent sessions, and an answer
# to any request of the connection counts, so a repeat is for what a broker or a cloud
# lost; 5 s was shorter than a busy cloud's answer, and 10,000 simulated devices then
# sent four requests each.
SYNC_RETRY = backoff.Backoff(base=15.0, cap=300.0, floor=10.0)

# (command name, what it did or why it was refused, the time the device acted)
CommandListener = Callable[[str, "dict[str, Any] | CommandRejected", float], None]


class CommandCounts(Protocol):
    """The counters commands add to (``TransportStats`` has them)."""

    syncs: int
    commands_applied: int
    commands_ignored: int
    commands_rejected: int


class Commands:
    """What the cloud says to one device: its sync answers and its commands."""

    __slots__ = (
        "_prefix",
        "_syncs",
        "clock",
        "counts",
        "device",
        "listener",
        "rng",
        "synced",
        "wake",
    )

    def __init__(
        self,
        device: Device,
        counts: CommandCounts,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        wake: Callable[[], None],
        listener: CommandListener | None = None,
    ) -> None:
        self.device = device
        self.counts = counts
        self.clock = clock
        self.rng = rng
        self.wake = wake  # something may have become sendable
        self.listener = listener
        # Set once the cloud answered this connection's command sync (commands first).
        self.synced = Flag()
        # This connection's command sync requests awaiting an answer: sync_id -> sent at.
        # Any of them answered is enough (each covers every command issued before this
        # connection); a request from an earlier connection is not.
        self._syncs: dict[str, float] = {}
        self._prefix = down_filter(device.device_id).removesuffix("+")  # down/ topics

    @property
    def device_id(self) -> str:
        """The device the commands are for."""
        return self.device.device_id

    def lost(self) -> None:
        """The connection is gone: the next one syncs again, and earlier answers do not count."""
        self.synced.clear()
        self._syncs.clear()

    # -- commands first ------------------------------------------------------------
    async def sync(self, conn: Link) -> None:
        """Ask the cloud for the commands it issued before this connection, until it answers."""
        attempt = 0
        while not self.synced.is_set():
            sync_id = uuid.uuid4().hex
            sent = self.clock()
            self._syncs[sync_id] = sent
            body = {"sync_id": sync_id, "device_id": self.device_id, "sent_at": rfc3339(sent)}
            conn.publish_nowait(up_topic(self.device_id, "sync"), json.dumps(body).encode())
            conn.flush()
            wait = SYNC_RETRY.delay(attempt, self.rng)
            await wait_at_most(self.synced, wait)
            if not self.synced.is_set():
                attempt += 1
                log.warning(
                    "no answer to the command sync: personal data waits for the cloud",
                    extra={"device": self.device_id, "waited_s": round(wait, 1)},
                )

    def _sync_answered(self, payload: bytes, now: float) -> None:
        answer = parse_sync(payload)
        sent = self._syncs.get(answer.sync_id)
        if sent is None:
            return  # an answer to an earlier connection's request, or a repeated one
        clock = Clock.from_sync(sent, parse_rfc3339(answer.now), now)
        self.device.clock_compared(clock, now=now)
        self.counts.syncs += 1
        self._syncs.clear()
        self.synced.set()
        log.info(
            "commands synced",
            extra={
                "device": self.device_id,
                "clock_offset_s": round(clock.offset, 3),
                "clock_error_s": round(clock.error, 3),
            },
        )
        self.wake()

    # -- incoming ----------------------------------------------------------------
    def on_message(self, message: mqtt.Incoming) -> None:
        """One message from the broker, taken as the socket is read; the adapter
        acknowledges it when this returns."""
        prefix = self._prefix
        topic, payload = message.topic, message.payload
        now = self.clock()
        if not topic.startswith(prefix) or payload is None:
            self._rejected("", CommandRejected("bad-topic"), now)
        elif topic == prefix + "sync":
            try:
                self._sync_answered(payload, now)
            except CommandRejected as exc:
                self._rejected("sync", exc, now)
        else:
            # An effect that cannot be made durable raises here: not acknowledged, the
            # connection ends, and the broker delivers the command again.
            self.handle(topic.removeprefix(prefix), payload)

    def handle(self, name: str, payload: bytes) -> None:
        """Validate and carry out one command; hostile input is logged, never raised.

        Returns once the effect is durable (or the command is refused for good);
        raises TransportError if the effect could not be written.
        """
        now = self.clock()
        try:
            command = parse(name, payload)
            taken = self.device.take(command, now=now)
        except CommandRejected as exc:
            self._rejected(name, exc, now)
            return
        except AgentError as exc:
            log.error(  # noqa: TRY400  # an expected failure, no traceback
                "command not applied: its effect could not be written",
                extra={"device": self.device_id, "command": name, "error": str(exc)},
            )
            raise TransportError(f"command {name} not applied: {exc}") from exc
        if taken.applied:
            self.counts.commands_applied += 1
        else:
            self.counts.commands_ignored += 1
        log.info(
            "command taken",
            extra={
                "device": self.device_id,
                "command": name,
                "command_id": command.command_id,
                "result": taken.result,
            },
        )
        if self.listener is not None:
            self.listener(name, taken.result, now)
        self.wake()

    def _rejected(self, name: str, exc: CommandRejected, now: float) -> None:
        self.counts.commands_rejected += 1
        log.warning(
            "command rejected",
            extra={
                "device": self.device_id,
                "command": name[:64],
                "reason": exc.reason,
                "command_id": exc.command_id,
            },
        )
        if self.listener is not None:
            self.listener(name, exc, now)
