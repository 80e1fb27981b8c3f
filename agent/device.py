"""A device: the core's rules carried out on its store, and the hand-off to the transport.

``agent.core.rules`` decides (events in, plans out); ``Device`` carries each plan
out on the ``DeviceStore`` in one transaction, keeps the hand-off bookkeeping
(what is in flight with the transport) and tells its observers what changed.
Callers pass ``now``; the daemon, the CLI and the simulator drive it.

Observers implement ``DeviceObserver``: the transport (what may no longer leave,
what became sendable) and the simulator's ground truth (what was queued,
acknowledged and dropped).

Past 400 lines on purpose: carrying out plans and the hand-off bookkeeping share the
in-flight set, and splitting them would thread it through a second class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.config import AgentConfig
from agent.core import cloud, ledger, rules
from agent.core.commands import Command
from agent.core.consent import ConsentState, Decision, Reason, Source
from agent.core.items import (
    DropReason,
    ItemEvent,
    ItemState,
    Outgoing,
    item_step,
    overflow,
    retention_cutoff,
)
from agent.core.lifecycle import Event, State
from agent.core.location import CoarseLocation, Precision
from agent.core.ordering import Clock
from agent.core.purposes import DELETION_KIND, POLICIES, Purpose
from agent.core.rules import Plan
from agent.core.settings import Control, CoreConfig, CrashReport, Settings
from agent.errors import StorageError, TamperedRecord
from agent.store import faults
from agent.store.crash_files import CrashFiles
from agent.store.database import Database
from agent.store.keys import FileKeyStore
from agent.store.records import DeviceStore, StoredItem
from agent.store.statedir import locked

RETENTION_SWEEP_S = 60.0  # how often the outbox is swept for expired items (P7)
PERSONAL = frozenset(Purpose)

log = logging.getLogger("smartmi.device")

_T = TypeVar("_T")

__all__ = ["CoreConfig", "CrashReport", "Device", "DeviceObserver", "open_device"]


@dataclasses.dataclass(slots=True)
class Removed:
    """What a plan's write took out of the outbox, by reason: rows deleted (their
    msg_ids), and items made unreadable by shredding their key (counts; their rows go
    with the reaper, and the observers hear of each then)."""

    deleted: dict[DropReason, list[str]] = dataclasses.field(default_factory=dict)
    shredded: dict[DropReason, int] = dataclasses.field(default_factory=dict)

    def count(self, reason: DropReason) -> int:
        """How many items left the outbox for ``reason``, either way."""
        return len(self.deleted.get(reason, [])) + self.shredded.get(reason, 0)


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


class Device:
    """One device: its rules, its store, and what it has handed to the transport."""

    def __init__(
        self,
        store: DeviceStore,
        config: CoreConfig,
        *,
        now: float,
        crash_dirs: Sequence[Path] = (),
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.store = store
        self._crash_files = CrashFiles(store.db, store.device_id)
        self.config = config
        self.crash_dirs = tuple(crash_dirs)
        self._new_id = new_id
        self._observers: list[DeviceObserver] = []
        self._in_flight: dict[str, Outgoing] = {}
        # In flight when their purpose was withdrawn: a PUBACK may still come for
        # them (they left the device before the withdrawal), and is then ledgered.
        self._recalled: dict[str, Outgoing] = {}
        self.dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        # Cheap hand-offs: whether deletion requests may be pending (known after the
        # first look, set again by a wipe), and when retention was last swept.
        self._deletions_maybe = True
        self._last_sweep = float("-inf")
        # Fail closed (see ``settle``): narrowing plans in force in memory whose write
        # failed; a wipe not yet finished on disk; acknowledgements not yet recorded;
        # and the storage problem in force, if any.
        self._unsettled: list[Plan] = []
        self._wipe_pending: Plan | None = None
        self._wipe_journaled = False
        self._unrecorded: dict[str, tuple[Outgoing, float]] = {}
        self.storage_problem: StorageError | None = None
        self.safe_mode = False
        self._quarantined_seen = 0
        try:
            self._open(now)
        except StorageError as exc:
            self._enter_safe_mode(exc)

    def _open(self, now: float) -> None:
        store, config = self.store, self.config
        if (reason := store.pending_wipe()) is not None:
            log.warning(
                "an unfinished wipe was found in the journal; finishing it",
                extra={"device": self.device_id, "reason": reason},
            )
            store.finish_wipe()  # a wipe cut short by a crash is finished first (P9)
        control = self._load_control()
        raw = store.load_state()
        self.settings = (
            Settings.from_json(raw, config.policy_version, control)
            if raw
            else Settings.fresh(config.policy_version, control)
        )
        if raw is None and store.has_data_key():
            # The key exists but the state is gone (quarantined): queued items were
            # captured under consent we can no longer show, and the ledger belongs to
            # an owner we no longer know. All of it goes to quarantine, none is sent.
            store.quarantine_all("state record unreadable")
        self._queued = store.count()
        self._quarantined_seen = store.quarantined_outbox
        stored_firmware = self.settings.firmware_version
        self._carry_out(rules.purge_superseded(self.settings), now)
        if stored_firmware is not None and stored_firmware != config.firmware_version:
            self._carry_out(
                rules.firmware_updated(self.settings, config, now=now, msg_id=self._new_id()), now
            )
        elif self.settings.lifecycle is not State.FACTORY_NEW:
            self._carry_out(Plan(self.settings), now)

    def _enter_safe_mode(self, exc: StorageError) -> None:
        """Started on a full, read-only or damaged store: nothing personal is captured
        or sent, pending deletion requests still go (P10), and ``settle`` opens the
        store again once it can."""
        self.safe_mode = True
        self.storage_problem = exc
        self.settings = Settings.fresh(self.config.policy_version, Control.unreadable())
        self._queued = 0
        log.error(
            "safe mode: the store cannot be used; nothing personal is captured or sent",
            extra={"device": self.device_id, "kind": exc.kind, "error": str(exc)},
        )

    def _load_control(self) -> Control:
        try:
            raw = self.store.load_control()
        except TamperedRecord:
            # Fail closed: collection stays suspended until the cloud resumes it (P13).
            return Control.unreadable()
        return Control() if raw is None else Control.from_json(raw)

    def watch(self, observer: DeviceObserver) -> None:
        """Tell ``observer`` from now on what changes."""
        self._observers.append(observer)

    # -- views -------------------------------------------------------------
    @property
    def device_id(self) -> str:
        """This device's ID."""
        return self.config.device_id

    @property
    def lifecycle(self) -> State:
        """The lifecycle state."""
        return self.settings.lifecycle

    @property
    def consent(self) -> ConsentState:
        """The consent state as the pure gate sees it."""
        return self.settings.consent

    def decide(self, purpose: Purpose) -> Decision:
        """The single gate: may an item of ``purpose`` be captured or sent now?

        Nothing personal while a narrowing or a wipe is not yet durable, or in safe mode.
        """
        if self.unsettled:
            return Decision(allowed=False, reason=Reason.NOT_DURABLE)
        return rules.decide(self.settings, purpose)

    @property
    def needs_settling(self) -> bool:
        """Whether ``settle`` has work: a storage problem, or anything not yet durable."""
        return self.storage_problem is not None or self.unsettled or bool(self._unrecorded)

    @property
    def unsettled(self) -> bool:
        """Whether a narrowing, a wipe or the store itself is not yet settled on disk."""
        return bool(self._unsettled) or self._wipe_pending is not None or self.safe_mode

    def queued_count(self) -> int:
        """How many items wait in the outbox (not counting deletion requests)."""
        self._count_quarantined()
        return self._queued

    def _count_quarantined(self) -> None:
        """Outbox rows the store moved to quarantine are no longer queued."""
        moved = self.store.quarantined_outbox - self._quarantined_seen
        if moved:
            self._quarantined_seen += moved
            self._queued -= moved

    def in_flight(self) -> list[str]:
        """msg_ids handed to the transport and not yet acknowledged."""
        return list(self._in_flight)

    # -- carrying out a plan -------------------------------------------------
    def _carry_out(
        self, plan: Plan, now: float, *, also: Callable[[], None] | None = None
    ) -> Removed:
        """Write ``plan`` in one transaction, then stop what may not leave and tell observers.

        Returns what the plan removed from the outbox. When the write fails a narrowing
        plan still takes effect in memory, everything personal stays stopped until it is
        durable (``settle``), and the StorageError is raised for the caller to report; any
        other plan changes nothing, and a capture is dropped and counted. ``also`` is a
        write of the caller's that commits with the plan's, or not at all.
        """
        if plan.stop:
            # Before anything is written: the transport stops these purposes first, so a
            # failed write leaves them stopped rather than leaving (fail closed).
            for o in self._observers:
                o.stopped(plan.stop)
        try:
            if self.unsettled and not self.settle(now=now):
                assert self.storage_problem is not None  # noqa: S101  # settle sets it
                raise self.storage_problem
            if plan.wipe is not None:
                return Removed({DropReason.WIPED: self._wipe(plan)})
            settings = plan.settings
            if plan.save:  # the record names the firmware that wrote it
                settings = dataclasses.replace(
                    settings, firmware_version=self.config.firmware_version
                )
            removed = self._durably(
                lambda: self._write(plan, settings, also=also), narrowing=plan.narrows
            )
        except StorageError as exc:
            self._failed(plan, exc)
            raise
        self.settings = settings
        if plan.capture is not None:  # counted before the drops its cap may have caused
            self._queued += 1
        self._account(removed)
        if (c := plan.capture) is not None:
            for o in self._observers:
                o.queued(c.msg_id, c.purpose, c.captured_at)
        if plan.capture is not None or (plan.save and not plan.stop) or plan.recoarsen:
            self._tell_sendable()
        return removed

    def _account(self, removed: Removed) -> None:
        """Count what a plan's write removed: the rows it deleted, and the items whose
        key it shredded (unreadable from now on; the observers hear of each when the
        reaper deletes its row)."""
        for reason, shredded in removed.shredded.items():
            self._queued -= shredded
            self.dropped[reason] += shredded
        for reason, msg_ids in removed.deleted.items():
            self._drop(msg_ids, reason)

    def _durably(self, write: Callable[[], _T], *, narrowing: bool) -> _T:
        """Run a write; on a full disk, a narrowing write may spend the store's reserve."""
        try:
            result = write()
        except StorageError as exc:
            if not (narrowing and exc.kind == faults.FULL and self.store.db.release_reserve()):
                raise
            log.warning(
                "disk full: the reserve was released for a privacy-reducing write",
                extra={"device": self.device_id},
            )
            result = write()
        self.storage_problem = None
        return result

    def _failed(self, plan: Plan, exc: StorageError) -> None:
        """A plan's write failed: fail closed, and say so."""
        if plan.capture is not None:
            self.dropped[DropReason.STORAGE] += 1
        if plan.narrows and plan.wipe is None and plan not in self._unsettled:
            # In force in memory from now on; written by ``settle``.
            self._unsettled.append(plan)
            self.settings = plan.settings
        if self.unsettled:
            for o in self._observers:
                o.stopped(PERSONAL)
        self._storage_failed(
            "storage write failed",
            exc,
            narrowing=plan.narrows,
            capture_dropped=plan.capture is not None,
            personal_stopped=self.unsettled,
        )

    def _storage_failed(self, message: str, exc: StorageError, **fields: object) -> None:
        """Note a storage failure and log it: kind and message, never values."""
        self.storage_problem = exc
        extra = {"device": self.device_id, "kind": exc.kind, "error": str(exc), **fields}
        log.error(message, extra=extra)  # the kind says it; no traceback

    def settle(self, *, now: float) -> bool:
        """Make durable what is in force only in memory: a safe-mode store, a wipe,
        narrowing plans, acknowledgements. True when nothing is left unsettled."""
        try:
            if self.safe_mode:
                self.safe_mode = False
                try:
                    self._open(now)
                except StorageError:
                    self.safe_mode = True
                    raise
                log.info("store usable again: safe mode ends", extra={"device": self.device_id})
            if self._wipe_pending is not None:
                self._finish_wipe(self._wipe_pending)
            while self._unsettled:
                plan = self._unsettled[0]
                removed = self._durably(
                    lambda plan=plan: self._write(plan, plan.settings, control=True),  # type: ignore[misc]
                    narrowing=True,
                )
                self._unsettled.pop(0)
                self._account(removed)
            for msg_id, (out, at) in list(self._unrecorded.items()):
                self._record_ack(msg_id, out, at)
                del self._unrecorded[msg_id]
        except StorageError as exc:
            self.storage_problem = exc
            return False
        self.storage_problem = None
        self.store.db.ensure_reserve()
        self._tell_sendable()
        return True

    def _write(
        self,
        plan: Plan,
        settings: Settings,
        *,
        control: bool = False,
        also: Callable[[], None] | None = None,
    ) -> Removed:
        """The store's part of a plan, in one transaction: purge, re-coarsen, capture,
        ledger, save."""
        removed = Removed()
        drops = removed.deleted
        with self.store.db.transaction():
            for purge in plan.purge:
                if purge.before is not None:
                    # Only what was captured before a later change (SPEC §3): the rows go,
                    # in flight or not (a PUBACK may still come for those; it is ledgered).
                    drops.setdefault(purge.reason, []).extend(
                        self.store.purge_older_than(purge.purpose, purge.before)
                    )
                    continue
                # In flight: deleted now (a PUBACK may still come; it is ledgered). The
                # rest: their item key is destroyed, whatever their number (P2).
                flying = [m for m, o in self._in_flight.items() if o.purpose is purge.purpose]
                gone = self.store.delete_items(flying)
                shredded, legacy = self.store.shred_purpose(purge.purpose, purge.reason.value)
                drops.setdefault(purge.reason, []).extend(gone + legacy)
                removed.shredded[purge.reason] = removed.shredded.get(purge.reason, 0) + shredded
            for change in plan.recoarsen:
                self.store.rewrite(
                    Purpose.ACTIVATION,
                    functools.partial(rules.recoarsened, precision=change.precision),
                    before=change.before,
                )
            if also is not None:
                also()
            if plan.capture is not None:
                c = plan.capture
                self.store.enqueue(c.msg_id, c.purpose, c.captured_at, c.payload)
                excess = overflow(self._queued + 1, self.config.outbox_cap)
                if excess:
                    drops[DropReason.CAPACITY] = self.store.purge_oldest(excess)
            for entry in plan.ledger:
                self.store.append_ledger(entry)
            if plan.save:
                self.store.save_state(settings.to_json())
            if control or settings.control != self.settings.control:
                self.store.save_control(settings.control.to_json())
        return removed

    def _tell_sendable(self) -> None:
        for o in self._observers:
            o.sendable()

    def reap(self, limit: int = 512) -> int:
        """Delete up to ``limit`` rows of shredded item keys (unreadable already) and tell
        the observers; how many went. A store error waits for the next call."""
        try:
            done = self.store.reap(limit)
        except StorageError as exc:
            self._storage_failed("reaping shredded items failed; tried again later", exc)
            return 0
        self._tell_reaped()
        return done

    def reap_all(self) -> int:
        """Reap until nothing shredded is left (tests, and before a run's end)."""
        total = 0
        while self.store.shredded_pending() and (done := self.reap(1 << 14)):
            total += done
        return total

    def _tell_reaped(self) -> None:
        """Shredded rows deleted (by the reaper or along with others): counted when
        shredded, so the observers only hear of them now."""
        for reason, msg_ids in self.store.take_reaped().items():
            if msg_ids:
                for o in self._observers:
                    o.dropped(msg_ids, DropReason(reason))

    def _drop(self, msg_ids: list[str], reason: DropReason) -> None:
        """Account for outbox rows just deleted, and tell the observers to forget them."""
        self._tell_reaped()
        if not msg_ids:
            return
        self.dropped[reason] += len(msg_ids)
        self._queued -= len(msg_ids)
        for msg_id in msg_ids:
            out = self._in_flight.pop(msg_id, None)
            if out is not None:
                item_step(ItemState.IN_FLIGHT, ItemEvent.DROP)
                self._recalled[msg_id] = out
        for o in self._observers:
            o.dropped(msg_ids, reason)

    def _wipe(self, plan: Plan) -> list[str]:
        """P9: the wipe takes effect in memory first (nothing personal leaves from here
        on, whatever the disk does), then the journal with its deletion request, then
        key, rows and crash files. A step that fails is finished by ``settle``, and
        after a crash by the next open (the journal)."""
        assert plan.wipe is not None  # noqa: S101  # the caller checked
        # Everything personal that the transport still holds must go too. An item in
        # flight keeps its outbox row until acknowledged, so the rows name them all.
        try:
            self.reap_all()  # shredded rows first: the observers hear of them as shredded
            doomed = self.store.msg_ids()
        except StorageError:
            doomed = [m for m, o in self._in_flight.items() if o.purpose is not None]
        self._in_flight = {k: v for k, v in self._in_flight.items() if v.purpose is None}
        self._unrecorded = {k: v for k, v in self._unrecorded.items() if v[0].purpose is None}
        self._recalled.clear()
        self._unsettled.clear()  # the wipe supersedes them
        self.dropped[DropReason.WIPED] += len(doomed)
        self._queued = 0
        self.settings = plan.settings
        self._wipe_pending, self._wipe_journaled = plan, False
        for o in self._observers:
            o.dropped(doomed, DropReason.WIPED)
        self._finish_wipe(plan)
        return doomed

    def _finish_wipe(self, plan: Plan) -> None:
        """The wipe's durable steps; each one may be repeated."""
        wipe = plan.wipe
        assert wipe is not None  # noqa: S101  # only wipe plans are pending
        if not self._wipe_journaled:

            def journal() -> None:
                with self.store.db.transaction():
                    if wipe.journal:
                        self.store.begin_wipe(wipe.reason, wipe.deletion_request)
                    self.store.save_control(plan.settings.control.to_json())

            self._durably(journal, narrowing=True)
            self._wipe_journaled = True
        self._durably(self.store.finish_wipe, narrowing=True)
        for crash_dir in self.crash_dirs:
            if not crash_dir.is_dir():
                continue
            try:
                for crash_file in crash_dir.iterdir():
                    if not crash_file.is_dir():
                        crash_file.unlink()  # a link goes, never what it points at
            except OSError as exc:
                raise faults.mapped(exc, crash_dir) from exc
        self._wipe_pending = None
        if wipe.deletion_request is not None:
            self._deletions_maybe = True
            self._tell_sendable()

    def _decided_on(self, now: float) -> Settings:
        """The settings a user's or the cloud's action is decided on. In safe mode they
        are a placeholder, not the device's: the action fails with the store's error
        (reported to the user; a cloud command is not acknowledged and comes again)
        rather than being decided on, and lost with, the placeholder."""
        if self.safe_mode and not self.settle(now=now):
            assert self.storage_problem is not None  # noqa: S101  # settle sets it
            raise self.storage_problem
        return self.settings

    # -- lifecycle ---------------------------------------------------------
    def bind(self, binding_id: str, *, now: float, minor: bool = False) -> None:
        """Bind to an owner; an activation becomes due (first, or restore after a wipe)."""
        plan = rules.bind(
            self._decided_on(now),
            self.config,
            binding_id,
            minor=minor,
            restored=self.store.wipe_count() > 0,
            now=now,
            msg_id=self._new_id(),
        )
        self._carry_out(plan, now)

    def firmware_updated(self, version: str, *, now: float) -> None:
        """A new firmware runs: a fresh activation is due if the device is bound."""
        self.config = dataclasses.replace(self.config, firmware_version=version)
        plan = rules.firmware_updated(
            self._decided_on(now), self.config, now=now, msg_id=self._new_id()
        )
        self._carry_out(plan, now)

    def set_policy_version(self, version: str, *, now: float) -> None:
        """The configured privacy policy changed: earlier grants stop counting (P6)."""
        self.config = dataclasses.replace(self.config, policy_version=version)
        plan = rules.policy_changed(
            self._decided_on(now), self.config, now=now, msg_id=self._new_id()
        )
        self._carry_out(plan, now)

    def unbind(self, *, now: float) -> str | None:
        """The owner deleted the device in the app; returns the deletion request's msg_id."""
        return self._wipe_for(Event.UNBIND, now)

    def factory_reset(self, *, now: float) -> str | None:
        """Factory reset; returns the deletion request's msg_id (None if nothing was bound)."""
        return self._wipe_for(Event.FACTORY_RESET, now)

    def account_cancelled(self, *, now: float) -> str | None:
        """The owner's account was cancelled; returns the deletion request's msg_id."""
        return self._wipe_for(Event.ACCOUNT_CANCELLED, now)

    def _wipe_for(self, event: Event, now: float) -> str | None:
        plan = rules.wipe(self._decided_on(now), self.config, event, now=now, msg_id=self._new_id())
        self._carry_out(plan, now)
        request = plan.wipe.deletion_request if plan.wipe else None
        log.info(
            "wiped",
            extra={
                "device": self.device_id,
                "reason": event.value,
                "deletion_request": bool(request),
            },
        )
        return request[0] if request else None

    # -- consent -----------------------------------------------------------
    def grant(self, purpose: Purpose, *, now: float, source: Source = "local") -> bool:
        """Grant consent for a purpose; returns False if it was already in force."""
        plan = rules.grant(
            self._decided_on(now),
            self.config,
            purpose,
            now=now,
            source=source,
            msg_id=self._new_id(),
        )
        self._carry_out(plan, now)
        log.info(
            "consent granted",
            extra={"device": self.device_id, "purpose": purpose.value, "source": source,
                   "changed": not plan.noop},
        )  # fmt: skip
        return not plan.noop

    def withdraw(self, purpose: Purpose, *, now: float, source: Source = "local") -> int:
        """Withdraw consent (P2): before this returns, nothing of ``purpose`` is pending
        anywhere; returns how many pending items were destroyed.

        In one small durable write whatever their number: the purpose's item key is
        destroyed, so its items can never be read or sent again (crypto-shredding); the
        reaper deletes their rows later, and the observers hear of each then. Items in
        flight are deleted at once (their PUBACK, if it comes, is ledgered).
        """
        plan = rules.withdraw(self._decided_on(now), self.config, purpose, now=now, source=source)
        removed = self._carry_out(plan, now).count(DropReason.WITHDRAWN)
        log.info(
            "consent withdrawn",
            extra={"device": self.device_id, "purpose": purpose.value, "source": source,
                   "pending_deleted": removed},
        )  # fmt: skip
        return removed

    def set_suspended(self, value: bool, *, now: float, source: Source = "local") -> None:
        """Suspend (P13) or resume all personal-data collection, on the device's word.

        The cloud's ``suspend-collection`` goes through ``take``, which orders it by its
        issue time and deletes what was captured after it.
        """
        settings = self._decided_on(now)
        stamp = rules.local_stamp(settings, now)
        plan = rules.suspension(
            settings,
            self.config,
            value,
            now=now,
            source=source,
            msg_id=self._new_id(),
            stamp=stamp,
        )
        self._carry_out(plan, now)

    # -- cloud commands and the clock ------------------------------------------
    def take(self, command: Command, *, now: float) -> cloud.Taken:
        """Carry out a cloud command (SPEC §3); durable when this returns.

        Raises CommandRejected when the command may not be taken at all.
        """
        taken = cloud.take(
            self._decided_on(now), self.config, command, now=now, msg_id=self._new_id()
        )
        self._carry_out(taken.plan, now)
        return taken

    def clock_compared(self, clock: Clock, *, now: float) -> None:
        """The command sync measured the device clock against the cloud's (SPEC §3).

        Kept in memory when the store refuses it: it only orders later choices, and a
        restart forgets it (the order is then unknown, and narrowing wins).
        """
        plan = rules.clock_compared(self.settings, clock)
        try:
            self._carry_out(plan, now)
        except StorageError:
            self.settings = plan.settings

    # -- location ----------------------------------------------------------
    def set_precision(self, precision: Precision, *, now: float) -> None:
        """Change the location precision; a stored location can only get coarser (P3)."""
        self._carry_out(rules.set_precision(self._decided_on(now), precision, now=now), now)

    def set_location(self, lat: float, lon: float, *, now: float) -> CoarseLocation | None:
        """Take a position; it is coarsened on entry, the exact value is never kept (P3)."""
        self._carry_out(rules.set_location(self._decided_on(now), lat, lon), now)
        return self.settings.location

    # -- capture -----------------------------------------------------------
    def capture_crash(self, report: CrashReport, *, now: float) -> str:
        """Queue crash diagnostics if diagnostics consent is in force; return the msg_id."""
        plan = rules.crash(
            self._decided_on(now), self.config, report, now=now, msg_id=self._new_id()
        )
        self._carry_out(plan, now)
        assert plan.capture is not None  # noqa: S101  # rules.crash raises otherwise
        return plan.capture.msg_id

    def capture_crash_file(self, report: CrashReport, *, now: float, msg_id: str) -> None:
        """``capture_crash`` of a crash file claimed as ``msg_id``, with the note that it
        was captured in the capture's own transaction (``crash_file_captured``)."""
        plan = rules.crash(self._decided_on(now), self.config, report, now=now, msg_id=msg_id)
        self._carry_out(plan, now, also=functools.partial(self._crash_files.note, msg_id))

    def crash_file_captured(self, msg_id: str) -> bool:
        """Whether the crash file claimed as ``msg_id`` was captured before."""
        return self._crash_files.captured(msg_id)

    def crash_file_gone(self, msg_id: str) -> None:
        """The crash file claimed as ``msg_id`` is deleted: forget its note."""
        self._crash_files.forget(msg_id)

    # -- hand-off to the transport -----------------------------------------
    def next_batch(self, *, now: float, limit: int = 32, personal: bool = True) -> list[Outgoing]:
        """Items to publish now, marked in flight: deletion requests first, then the outbox.

        Items past retention are deleted first and never returned (P7); an item is
        returned only if the gate allows its purpose now (P1, P2, P6). With
        ``personal`` false only deletion requests are returned (commands first).
        """
        out: list[Outgoing] = []
        if self.needs_settling:
            self.settle(now=now)
        if self._unrecorded:
            # An acknowledgement could not be recorded: the drain pauses (no re-send
            # loop) until the store takes writes again. A store problem alone does not
            # hold back deletion requests (safe mode sends them).
            return out
        try:
            return self._next_batch(out, now=now, limit=limit, personal=personal)
        except StorageError as exc:
            self._storage_failed("storage read failed; sending paused", exc)
            self.give_back([o.msg_id for o in out])
            return []

    def _next_batch(
        self, out: list[Outgoing], *, now: float, limit: int, personal: bool
    ) -> list[Outgoing]:
        if self.store.shredded_pending():
            self.reap()  # a bounded batch per hand-off, until the shredded rows are gone
        if self._deletions_maybe:
            requests = self.store.deletion_requests(now=now)
            self._deletions_maybe = bool(requests)
            waiting = [dr for dr in requests if dr.msg_id not in self._in_flight]
            out.extend(self._hand_off(dr, None) for dr in waiting[:limit])
        if not self._last_sweep <= now < self._last_sweep + RETENTION_SWEEP_S:
            # The full sweep runs at most once a minute (or when the clock went back);
            # between sweeps an expired item is still caught below, before it is sent.
            with self._noted():
                self.sweep_retention(now=now)
        allowed = {p for p in Purpose if personal and self.decide(p).allowed}
        if len(out) >= limit or not allowed:
            return out
        expired: list[str] = []
        items = self.store.queued(limit - len(out), frozenset(self._in_flight))
        self._count_quarantined()
        for item in items:
            verdict = rules.may_send(self.settings, item.purpose, item.captured_at, now)
            if verdict == "expired":
                expired.append(item.msg_id)  # P7: never sent
            elif verdict == "send":
                out.append(self._hand_off(item, item.purpose))
        if expired:
            with self._noted():  # not sent either way; deleted by a later sweep
                self._drop(self.store.delete_items(expired), DropReason.EXPIRED)
        return out

    @contextlib.contextmanager
    def _noted(self) -> Iterator[None]:
        """A write that may fail without harm (nothing leaves because of it): note it."""
        try:
            yield
        except StorageError as exc:
            self.storage_problem = exc

    def sweep_retention(self, *, now: float) -> int:
        """Delete every queued item past its purpose's retention (P7); how many."""
        self._last_sweep = now
        swept = 0
        self.reap_all()
        for purpose in Purpose:
            cutoff = retention_cutoff(purpose, now)
            expired = self.store.purge_older_than(purpose, cutoff)
            self._drop(expired, DropReason.EXPIRED)
            swept += len(expired)
        return swept

    def _hand_off(self, item: StoredItem, purpose: Purpose | None) -> Outgoing:
        item_step(ItemState.QUEUED, ItemEvent.HAND_OFF)
        kind = DELETION_KIND if purpose is None else POLICIES[purpose].kind
        out = Outgoing(item.msg_id, kind, purpose, item.payload, item.captured_at)
        self._in_flight[item.msg_id] = out
        return out

    def acknowledged(self, msg_id: str, *, now: float) -> bool:
        """The broker acknowledged ``msg_id``: remove it and ledger it, atomically."""
        out = self._in_flight.pop(msg_id, None)
        if out is None:
            recalled = self._recalled.pop(msg_id, None)
            if recalled is None:
                return False
            for o in self._observers:
                o.acknowledged(msg_id, now)
            if recalled.purpose is not None:
                self.store.append_ledger(
                    ledger.sent_entry(msg_id, recalled.purpose.value, recalled.payload, now=now)
                )
            return False
        item_step(ItemState.IN_FLIGHT, ItemEvent.ACK)
        for o in self._observers:
            o.acknowledged(msg_id, now)
        try:
            self._record_ack(msg_id, out, now)
        except StorageError as exc:
            # It reached the broker; it is not handed off again while this is pending,
            # and the drain pauses until it is recorded (``next_batch``, ``settle``).
            self._unrecorded[msg_id] = (out, now)
            self._storage_failed(
                "acknowledgement not recorded; sending paused until the store takes writes", exc
            )
        return True

    def _record_ack(self, msg_id: str, out: Outgoing, at: float) -> None:
        """Record an acknowledgement in one transaction (undone alone inside a caller's);
        the count changes only once it is committed."""
        with self.store.db.transaction():
            if out.purpose is None:
                self.store.remove_deletion_request(msg_id)
                return
            entry = ledger.sent_entry(msg_id, out.purpose.value, out.payload, now=at)
            removed = self.store.acknowledge(msg_id, entry)
        if removed:
            self._queued -= 1

    def give_back(self, msg_ids: list[str]) -> None:
        """Items from ``next_batch`` that were never handed over wait again, quietly."""
        for msg_id in msg_ids:
            if self._in_flight.pop(msg_id, None) is not None:
                item_step(ItemState.IN_FLIGHT, ItemEvent.REQUEUE)

    def retry(self, msg_id: str) -> None:
        """A hand-off failed (connection lost, PUBACK refused): the item waits again."""
        if self._in_flight.pop(msg_id, None) is not None:
            item_step(ItemState.IN_FLIGHT, ItemEvent.REQUEUE)
            self._tell_sendable()

    def connection_lost(self, *, now: float) -> None:
        """Every in-flight item goes back to queued (same msg_id: at-least-once).

        Items whose purpose stopped while they were on the wire can get no PUBACK now:
        they left the device, unconfirmed, and the ledger says so (P11).
        """
        recalled, self._recalled = self._recalled, {}
        entries = [
            ledger.sent_entry(m, o.purpose.value, o.payload, now=now, confirmed=False)
            for m, o in recalled.items()
            if o.purpose is not None
        ]
        try:
            if entries and self.store.has_data_key():
                with self.store.db.transaction():
                    for entry in entries:
                        self.store.append_ledger(entry)
        except StorageError as exc:
            self._recalled.update(recalled)  # ledgered at the next loss instead
            self.storage_problem = exc
        for msg_id in list(self._in_flight):
            self.retry(msg_id)

    # -- P11 ---------------------------------------------------------------
    def export(self, *, now: float) -> dict[str, Any]:
        """The ledger as the JSON document a user receives."""
        return ledger.export(self.device_id, self.store.ledger(), now=now)

    def status(self) -> dict[str, Any]:
        """A summary for the CLI and the control socket (no personal values)."""
        s = self.settings
        return {
            "device_id": self.device_id,
            "lifecycle": s.lifecycle.value,
            "activation_due": s.activation_trigger,
            "minor": s.consent.minor,
            "suspended": s.control.suspended,
            "clock_offset_s": None if s.control.clock is None else round(s.control.clock.offset, 3),
            "policy_version": self.config.policy_version,
            "consent": {p.value: self.decide(p).reason.value for p in Purpose},
            "precision": s.precision.value,
            "location_set": s.location is not None,
            "queued": self.queued_count(),
            "in_flight": len(self._in_flight),
            "deletion_requests_pending": self._read_or_none(
                lambda: len(self.store.deletion_requests())
            ),
            "deletion_requests_recreated": self.store.deletions_recreated,
            "deletion_requests_lost": self.store.deletions_lost,
            "quarantined": self._read_or_none(self.store.quarantined),
            "dropped": {r.value: n for r, n in self.dropped.items() if n},
            "storage": self.storage_status(),
        }

    def storage_status(self) -> dict[str, Any]:
        """The store's health as ``status`` shows it; ``ok`` false while anything is
        not durable or the last write failed."""
        problem = self.storage_problem
        return {
            "ok": not self.needs_settling,
            "kind": None if problem is None else problem.kind,
            "error": None if problem is None else str(problem),
            "safe_mode": self.safe_mode,
            "wipe_pending": self._wipe_pending is not None,
            "narrowing_not_durable": len(self._unsettled),
            "acknowledgements_not_recorded": len(self._unrecorded),
        }

    def _read_or_none(self, read: Callable[[], int]) -> int | None:
        with self._noted():
            return read()
        return None


@contextlib.contextmanager
def open_device(
    config: AgentConfig, *, now: float | None = None, wait_s: float = 0.0
) -> Iterator[Device]:
    """The device over its state directory, locked for the duration (waiting up to
    ``wait_s`` for another process to let the lock go)."""
    with locked(config.state_dir, wait_s=wait_s):
        db = Database(config.state_dir / "state.db")
        try:
            store = DeviceStore(db, config.device.id, FileKeyStore(config.state_dir / "keys"))
            yield Device(
                store,
                config.core_config(),
                now=time.time() if now is None else now,
                crash_dirs=config.crash_dirs,
            )
        finally:
            db.close()
