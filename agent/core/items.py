"""Outbox item states and the pure rules of retention and capacity (P2, P7).

Every state change of an outbox item is defined in ``TRANSITIONS``::

    queued --hand-off--> in-flight --ack--> acknowledged
      ^                     |
      +------requeue--------+          (connection lost, PUBACK refused)
    queued | in-flight --drop--> dropped   (withdrawal, retention, cap, wipe)

Only ``queued`` items are persisted; ``in-flight`` lives in memory, so after a
crash or restart every unacknowledged item is queued again with the same msg_id
(at-least-once; the cloud de-duplicates). An acknowledgement deletes the row and
writes the ledger entry in one transaction, so an acknowledged item never returns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from agent.core.purposes import POLICIES, Purpose
from agent.errors import IllegalTransition


class ItemState(enum.StrEnum):
    """Where an outbox item is."""

    QUEUED = "queued"
    IN_FLIGHT = "in-flight"
    ACKNOWLEDGED = "acknowledged"
    DROPPED = "dropped"


class ItemEvent(enum.StrEnum):
    """What can happen to an outbox item."""

    HAND_OFF = "hand-off"
    ACK = "ack"
    REQUEUE = "requeue"
    DROP = "drop"


TRANSITIONS: Final[dict[tuple[ItemState, ItemEvent], ItemState]] = {
    (ItemState.QUEUED, ItemEvent.HAND_OFF): ItemState.IN_FLIGHT,
    (ItemState.QUEUED, ItemEvent.DROP): ItemState.DROPPED,
    (ItemState.IN_FLIGHT, ItemEvent.ACK): ItemState.ACKNOWLEDGED,
    (ItemState.IN_FLIGHT, ItemEvent.REQUEUE): ItemState.QUEUED,
    (ItemState.IN_FLIGHT, ItemEvent.DROP): ItemState.DROPPED,
}


def item_step(state: ItemState, event: ItemEvent) -> ItemState:
    """The next state of an item, or IllegalTransition."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state.value, event.value) from None


class DropReason(enum.StrEnum):
    """Why an item left the outbox without being sent."""

    WITHDRAWN = "withdrawn"  # P2
    EXPIRED = "expired"  # P7 retention
    CAPACITY = "capacity"  # P7 cap, oldest first
    SUPERSEDED = "superseded"  # its grant no longer exists (policy change, re-grant)
    WIPED = "wiped"  # P9
    SUSPENDED = "suspended"  # captured after the service stopped, unknown to the device (P13)
    STORAGE = "storage"  # could not be stored (disk full, read-only, failing): never half-written


def retention_cutoff(purpose: Purpose, now: float) -> float:
    """Items of ``purpose`` captured before this time are past retention (P7)."""
    return now - POLICIES[purpose].retention_s


def expired(purpose: Purpose, captured_at: float, now: float) -> bool:
    """Whether an item is past its purpose's retention period."""
    return captured_at < retention_cutoff(purpose, now)


def overflow(count: int, cap: int) -> int:
    """How many of the oldest items must go so that ``count`` fits ``cap``."""
    return max(0, count - cap)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An item handed to the transport: what to publish and how to account for it."""

    msg_id: str
    kind: str
    purpose: Purpose | None  # None for deletion-request
    payload: bytes
    captured_at: float
