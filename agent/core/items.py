"""An outbox item's life, and the pure rules of retention and capacity (P2, P7, P11).

Every move of an item is in ``TRANSITIONS``; a move it does not list raises
IllegalTransition. ``Flights`` holds the items the device has handed off and not yet
finished with, and moves each one only through the table::

    queued --hand-off--> in-flight --ack--> left --record--> sent
    queued <--requeue, lost-- in-flight --drop--> recalled --ack, lost--> left
    recalled --requeue--> dropped         queued --drop--> dropped
    any held item but a deletion request --wipe--> dropped

- queued: a row in the outbox (on disk); everything not held by ``Flights`` is queued.
- in-flight: handed to the transport; a PUBACK may come.
- recalled: in flight when its row was deleted (withdrawal, retention, ...). It left
  the device before that, so a PUBACK may still come, and the ledger then says so.
- left: acknowledged by the broker (or recalled and its connection lost, unconfirmed);
  its ledger entry is built and waits to be written. Sending pauses while one waits.
- sent, dropped: final.

Only ``queued`` items are persisted; the rest live in memory, so after a crash every
unacknowledged item is queued again with the same msg_id (at-least-once; the cloud
de-duplicates). Recording an acknowledgement deletes the row and writes the ledger
entry in one transaction, so an acknowledged item never returns.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from agent.core import ledger
from agent.core.purposes import POLICIES, Purpose
from agent.errors import IllegalTransition


class ItemState(enum.StrEnum):
    """Where an outbox item is."""

    QUEUED = "queued"
    IN_FLIGHT = "in-flight"
    RECALLED = "recalled"
    LEFT = "left"
    SENT = "sent"
    DROPPED = "dropped"


class ItemEvent(enum.StrEnum):
    """What can happen to an outbox item."""

    HAND_OFF = "hand-off"  # given to the transport
    REQUEUE = "requeue"  # never handed over, or the broker refused it
    ACK = "ack"  # the broker's PUBACK
    LOST = "lost"  # the connection went before its PUBACK
    DROP = "drop"  # its row was deleted (withdrawal, retention, cap, suspension)
    WIPE = "wipe"  # P9
    RECORD = "record"  # its ledger entry is written and its row gone, in one transaction


_S, _E = ItemState, ItemEvent
TRANSITIONS: Final[dict[tuple[ItemState, ItemEvent], ItemState]] = {
    (_S.QUEUED, _E.HAND_OFF): _S.IN_FLIGHT,
    (_S.QUEUED, _E.DROP): _S.DROPPED,
    (_S.QUEUED, _E.WIPE): _S.DROPPED,
    (_S.IN_FLIGHT, _E.ACK): _S.LEFT,
    (_S.IN_FLIGHT, _E.REQUEUE): _S.QUEUED,
    (_S.IN_FLIGHT, _E.LOST): _S.QUEUED,
    (_S.IN_FLIGHT, _E.DROP): _S.RECALLED,
    (_S.IN_FLIGHT, _E.WIPE): _S.DROPPED,
    (_S.RECALLED, _E.ACK): _S.LEFT,
    (_S.RECALLED, _E.LOST): _S.LEFT,  # it was written out; unconfirmed (P11)
    (_S.RECALLED, _E.REQUEUE): _S.DROPPED,  # refused by the broker: it never left
    (_S.RECALLED, _E.WIPE): _S.DROPPED,
    (_S.LEFT, _E.DROP): _S.LEFT,  # it left before its row went: still ledgered
    (_S.LEFT, _E.RECORD): _S.SENT,
    (_S.LEFT, _E.WIPE): _S.DROPPED,
}
FINAL: Final = frozenset({ItemState.SENT, ItemState.DROPPED})


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


@dataclass(slots=True)
class Held:
    """An item the device has handed off and not finished with."""

    out: Outgoing
    state: ItemState
    entry: dict[str, Any] | None = field(default=None)  # the ledger entry, once it left


class Flights:
    """The items past ``queued`` and not yet final, by msg_id, each moved only through
    ``TRANSITIONS``. The transport knows them by paho's packet id alone."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def state(self, msg_id: str) -> ItemState:
        """Where ``msg_id`` is: queued unless held here."""
        held = self._held.get(msg_id)
        return ItemState.QUEUED if held is None else held.state

    def get(self, msg_id: str) -> Held | None:
        """The item as it was handed off, with its state, while it is held."""
        return self._held.get(msg_id)

    def ids(self, *states: ItemState) -> list[str]:
        """The msg_ids held in any of ``states``, in hand-off order."""
        return [m for m, h in self._held.items() if h.state in states]

    def held(self, *states: ItemState) -> Iterator[Held]:
        """The held items in any of ``states`` (a snapshot: moving them is allowed)."""
        return iter([h for h in self._held.values() if h.state in states])

    def hand_off(self, out: Outgoing) -> None:
        """``out`` is given to the transport."""
        self._move(out.msg_id, ItemEvent.HAND_OFF, Held(out, ItemState.QUEUED))

    def move(self, msg_id: str, event: ItemEvent, *, at: float = 0.0) -> ItemState:
        """Apply ``event`` to a held item; its new state. ACK and LOST build the ledger
        entry it leaves with (confirmed by the PUBACK, or not)."""
        held = self._held.get(msg_id)
        if held is None:
            raise IllegalTransition(ItemState.QUEUED.value, event.value)
        new = self._move(msg_id, event, held)
        if new is ItemState.LEFT and held.entry is None and held.out.purpose is not None:
            held.entry = ledger.sent_entry(
                msg_id,
                held.out.purpose.value,
                held.out.payload,
                now=at,
                confirmed=event is ItemEvent.ACK,
            )
        return new

    def _move(self, msg_id: str, event: ItemEvent, held: Held) -> ItemState:
        new = item_step(held.state, event)
        if new in FINAL or new is ItemState.QUEUED:
            self._held.pop(msg_id, None)
        else:
            held.state = new
            self._held[msg_id] = held
        return new
