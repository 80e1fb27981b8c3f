"""The hand-off to the transport: what leaves next, and each item's life after that.

An item's rows are in the store (``DeviceStore``); once handed off it is held by the
core's ``Flights`` and moves only through its table (``agent.core.items``): every
hand-off, PUBACK, refusal, drop, loss, wipe and ledger write below is one move. This
module counts what is queued and what was dropped, and tells the observers.
"""

from __future__ import annotations

import logging
from typing import Protocol

from agent.core import rules
from agent.core.items import (
    DropReason,
    Flights,
    ItemEvent,
    ItemState,
    Outgoing,
    retention_cutoff,
)
from agent.core.purposes import DELETION_KIND, POLICIES, Purpose
from agent.core.settings import Settings
from agent.device.health import Health
from agent.errors import IllegalTransition, StorageError
from agent.store.records import DeviceStore, StoredItem

RETENTION_SWEEP_S = 60.0  # how often the outbox is swept for expired items (P7)

HELD = (ItemState.IN_FLIGHT, ItemState.RECALLED, ItemState.LEFT)

log = logging.getLogger("smartmi.device")


class DeviceObserver(Protocol):
    """What a device tells the layers around it."""

    def dropped(self, msg_ids: list[str], reason: DropReason) -> None:
        """These items must not leave the device any more (P2, P7, P9)."""

    def sendable(self) -> None:
        """Something may have become sendable (a capture, a deletion request, a resume)."""

    def stopped(self, purposes: frozenset[Purpose]) -> None:
        """Nothing of these purposes may leave from now on; what the transport holds
        and has not written must not be written (P2, P3, P9, P13)."""

    def queued(self, msg_id: str, purpose: Purpose, at: float) -> None:
        """An item was queued with consent."""

    def acknowledged(self, msg_id: str, at: float) -> None:
        """The broker acknowledged an item."""


class HandOff:
    """One device's outbox as the transport sees it: counts, held items, observers."""

    def __init__(self, store: DeviceStore, health: Health) -> None:
        self.store = store
        self.health = health
        self.flights = Flights()
        self.observers: list[DeviceObserver] = []
        self.queued = 0  # rows in the outbox, deletion requests not counted
        self.dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        # Cheap hand-offs: whether deletion requests may be pending (known after the
        # first look, set again by a wipe), and when retention was last swept.
        self.deletions_maybe = True
        self._last_sweep = float("-inf")
        self._quarantined_seen = 0

    def opened(self) -> None:
        """The store was opened: count its outbox."""
        self.queued = self.store.count()
        self._quarantined_seen = self.store.quarantined_outbox

    def count_quarantined(self) -> None:
        """Outbox rows the store moved to quarantine are no longer queued."""
        moved = self.store.quarantined_outbox - self._quarantined_seen
        if moved:
            self._quarantined_seen += moved
            self.queued -= moved

    def in_flight(self, purpose: Purpose | None = None) -> list[str]:
        """msg_ids handed to the transport and not yet acknowledged (of ``purpose``)."""
        ids = self.flights.ids(ItemState.IN_FLIGHT)
        if purpose is None:
            return ids
        return [
            m for m in ids if (h := self.flights.get(m)) is not None and h.out.purpose is purpose
        ]

    @property
    def unrecorded(self) -> int:
        """Items that left whose ledger entry is not yet written (sending pauses)."""
        return len(self.flights.ids(ItemState.LEFT))

    # -- telling the observers -------------------------------------------------
    def tell_stopped(self, purposes: frozenset[Purpose]) -> None:
        for o in self.observers:
            o.stopped(purposes)

    def tell_queued(self, msg_id: str, purpose: Purpose, at: float) -> None:
        for o in self.observers:
            o.queued(msg_id, purpose, at)

    def tell_sendable(self) -> None:
        for o in self.observers:
            o.sendable()

    def tell_reaped(self) -> None:
        """Shredded rows deleted (by the reaper or along with others): counted when
        shredded, so the observers only hear of them now."""
        for reason, msg_ids in self.store.take_reaped().items():
            if msg_ids:
                for o in self.observers:
                    o.dropped(msg_ids, DropReason(reason))

    # -- items leaving the outbox unsent -----------------------------------------
    def drop(self, msg_ids: list[str], reason: DropReason) -> None:
        """Account for outbox rows just deleted, and tell the observers to forget them.
        One in flight is recalled: it left before its row went (a PUBACK may come)."""
        self.tell_reaped()
        if not msg_ids:
            return
        self.dropped[reason] += len(msg_ids)
        self.queued -= len(msg_ids)
        for msg_id in msg_ids:
            if msg_id in self.flights:
                self.flights.move(msg_id, ItemEvent.DROP)
        for o in self.observers:
            o.dropped(msg_ids, reason)

    def shredded(self, reason: DropReason, count: int) -> None:
        """Items made unreadable by shredding their key: counted now, told when reaped."""
        self.queued -= count
        self.dropped[reason] += count

    def wiped(self, doomed: list[str]) -> None:
        """P9: every personal item goes, held or queued; deletion requests stay."""
        for held in self.flights.held(*HELD):
            if held.out.purpose is not None:
                self.flights.move(held.out.msg_id, ItemEvent.WIPE)
        self.dropped[DropReason.WIPED] += len(doomed)
        self.queued = 0
        for o in self.observers:
            o.dropped(doomed, DropReason.WIPED)

    def reap(self, limit: int = 512) -> int:
        """Delete up to ``limit`` rows of shredded item keys (unreadable already) and tell
        the observers; how many went. A store error waits for the next call."""
        try:
            done = self.store.reap(limit)
        except StorageError as exc:
            self.health.failed("reaping shredded items failed; tried again later", exc)
            return 0
        self.tell_reaped()
        return done

    def reap_all(self) -> int:
        """Reap until nothing shredded is left (tests, and before a run's end)."""
        total = 0
        while self.store.shredded_pending() and (done := self.reap(1 << 14)):
            total += done
        return total

    def sweep_retention(self, *, now: float) -> int:
        """Delete every queued item past its purpose's retention (P7); how many."""
        self._last_sweep = now
        swept = 0
        self.reap_all()
        for purpose in Purpose:
            expired = self.store.purge_older_than(purpose, retention_cutoff(purpose, now))
            self.drop(expired, DropReason.EXPIRED)
            swept += len(expired)
        return swept

    # -- handing off ----------------------------------------------------------------
    def next_batch(
        self, settings: Settings, allowed: frozenset[Purpose], *, now: float, limit: int
    ) -> list[Outgoing]:
        """Items to publish now, in flight from here: deletion requests first, then the
        outbox items of ``allowed`` purposes that ``rules.may_send`` lets go (P1, P2, P6,
        P7). Nothing while an item that left is not yet ledgered."""
        out: list[Outgoing] = []
        if self.unrecorded:
            # An acknowledgement could not be recorded: the drain pauses (no re-send
            # loop) until the store takes writes again. A store problem alone does not
            # hold back deletion requests (safe mode sends them).
            return out
        try:
            self._next_batch(out, settings, allowed, now=now, limit=limit)
        except StorageError as exc:
            self.health.failed("storage read failed; sending paused", exc)
            self.give_back([o.msg_id for o in out])
            return []
        return out

    def _next_batch(
        self,
        out: list[Outgoing],
        settings: Settings,
        allowed: frozenset[Purpose],
        *,
        now: float,
        limit: int,
    ) -> None:
        if self.store.shredded_pending():
            self.reap()  # a bounded batch per hand-off, until the shredded rows are gone
        if self.deletions_maybe:
            requests = self.store.deletion_requests(now=now)
            self.deletions_maybe = bool(requests)
            waiting = [dr for dr in requests if dr.msg_id not in self.flights]
            out.extend(self._hand_off(dr, None) for dr in waiting[:limit])
        if not self._last_sweep <= now < self._last_sweep + RETENTION_SWEEP_S:
            # The full sweep runs at most once a minute (or when the clock went back);
            # between sweeps an expired item is still caught below, before it is sent.
            with self.health.noted():
                self.sweep_retention(now=now)
        if len(out) >= limit or not allowed:
            return
        expired: list[str] = []
        held = frozenset(self.flights.ids(*HELD))
        items = self.store.queued(limit - len(out), held)
        self.count_quarantined()
        for item in items:
            verdict = rules.may_send(settings, item.purpose, item.captured_at, now)
            if verdict == "expired":
                expired.append(item.msg_id)  # P7: never sent
            elif verdict == "send" and item.purpose in allowed:
                out.append(self._hand_off(item, item.purpose))
        if expired:
            with self.health.noted():  # not sent either way; deleted by a later sweep
                self.drop(self.store.delete_items(expired), DropReason.EXPIRED)

    def _hand_off(self, item: StoredItem, purpose: Purpose | None) -> Outgoing:
        kind = DELETION_KIND if purpose is None else POLICIES[purpose].kind
        out = Outgoing(item.msg_id, kind, purpose, item.payload, item.captured_at)
        self.flights.hand_off(out)
        return out

    # -- after the hand-off -------------------------------------------------------
    def acknowledged(self, msg_id: str, *, now: float) -> bool:
        """The broker acknowledged ``msg_id``: remove it and ledger it, atomically.
        False when it was not in flight (recalled, forgotten by a wipe, unknown)."""
        state = self.flights.state(msg_id)
        if state not in (ItemState.IN_FLIGHT, ItemState.RECALLED):
            return False
        self.flights.move(msg_id, ItemEvent.ACK, at=now)
        for o in self.observers:
            o.acknowledged(msg_id, now)
        try:
            self.record(msg_id)
        except StorageError as exc:
            # It reached the broker; it is not handed off again while this is pending,
            # and the drain pauses until it is recorded (``next_batch``, ``settle``).
            self.health.failed(
                "acknowledgement not recorded; sending paused until the store takes writes", exc
            )
        return state is ItemState.IN_FLIGHT

    def record(self, msg_id: str) -> None:
        """Write what left in one transaction (undone alone inside a caller's): its
        ledger entry and its row's removal, or a deletion request's removal. The count
        changes only once it is committed."""
        held = self.flights.get(msg_id)
        if held is None or held.state is not ItemState.LEFT:
            raise IllegalTransition(self.flights.state(msg_id).value, ItemEvent.RECORD.value)
        with self.store.db.transaction():
            if held.entry is None:
                self.store.remove_deletion_request(msg_id)
                removed = False
            else:
                removed = self.store.acknowledge(msg_id, held.entry)
        self.flights.move(msg_id, ItemEvent.RECORD)
        if removed:
            self.queued -= 1

    def record_all(self) -> None:
        """Record every item that left and is not yet ledgered (``settle``)."""
        for msg_id in self.flights.ids(ItemState.LEFT):
            self.record(msg_id)

    def give_back(self, msg_ids: list[str]) -> None:
        """Items from ``next_batch`` that were never handed over wait again, quietly."""
        self._requeue(msg_ids)

    def retry(self, msg_id: str) -> None:
        """A hand-off failed (connection lost, PUBACK refused): the item waits again."""
        if self._requeue([msg_id]):
            self.tell_sendable()

    def _requeue(self, msg_ids: list[str]) -> bool:
        moved = False
        for msg_id in msg_ids:
            if self.flights.state(msg_id) in (ItemState.IN_FLIGHT, ItemState.RECALLED):
                self.flights.move(msg_id, ItemEvent.REQUEUE)
                moved = True
        return moved

    def connection_lost(self, *, now: float) -> None:
        """Every in-flight item goes back to queued (same msg_id: at-least-once).

        Items whose purpose stopped while they were on the wire can get no PUBACK now:
        they left the device, unconfirmed, and the ledger says so (P11).
        """
        for msg_id in self.flights.ids(ItemState.RECALLED):
            self.flights.move(msg_id, ItemEvent.LOST, at=now)
        requeued = self.flights.ids(ItemState.IN_FLIGHT)
        for msg_id in requeued:
            self.flights.move(msg_id, ItemEvent.LOST)
        try:
            self.record_all()
        except StorageError as exc:
            self.health.problem = exc  # recorded by ``settle``; sending pauses until then
        if requeued:
            self.tell_sendable()
