"""Carrying out the core's plans on a device's store, failing closed.

``agent.core.rules`` decides (events in, plans out); ``Plans`` writes each plan in one
transaction, stops what may no longer leave before anything is written, and keeps in
force in memory what it could not yet write (``settle`` writes it later): a narrowing
plan, a wipe, a store that could not be opened at all (safe mode).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

from agent.core import rules
from agent.core.items import DropReason, overflow
from agent.core.lifecycle import State
from agent.core.purposes import Purpose
from agent.core.rules import Plan
from agent.core.settings import Control, CoreConfig, Settings
from agent.device.handoff import HandOff
from agent.device.health import Health
from agent.device.wipe import Wipe
from agent.errors import StorageError, TamperedRecord
from agent.store.records import DeviceStore

PERSONAL = frozenset(Purpose)

log = logging.getLogger("smartmi.device")


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


class Plans:
    """One device's settings, and the plans that change them, carried out durably."""

    def __init__(
        self,
        store: DeviceStore,
        config: CoreConfig,
        handoff: HandOff,
        health: Health,
        wipe: Wipe,
        *,
        new_id: Callable[[], str],
    ) -> None:
        self.store = store
        self.config = config
        self.handoff = handoff
        self.health = health
        self.wipe = wipe
        self._new_id = new_id
        self.settings = Settings.fresh(config.policy_version, Control.unreadable())
        # Fail closed (see ``settle``): narrowing plans in force in memory whose write
        # failed, and whether the store could not be opened at all.
        self.unsettled_plans: list[Plan] = []
        self.safe_mode = False

    @property
    def unsettled(self) -> bool:
        """Whether a narrowing, a wipe or the store itself is not yet settled on disk."""
        return bool(self.unsettled_plans) or self.wipe.pending is not None or self.safe_mode

    def open(self, now: float) -> None:
        """Read the settings and finish what a crash cut short; safe mode if the store
        cannot be used."""
        try:
            self._open(now)
        except StorageError as exc:
            self._enter_safe_mode(exc)

    def _open(self, now: float) -> None:
        store, config = self.store, self.config
        if (reason := store.pending_wipe()) is not None:
            log.warning(
                "an unfinished wipe was found in the journal; finishing it",
                extra={"device": store.device_id, "reason": reason},
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
        self.handoff.opened()
        stored_firmware = self.settings.firmware_version
        self.carry_out(rules.purge_superseded(self.settings), now)
        if stored_firmware is not None and stored_firmware != config.firmware_version:
            self.carry_out(
                rules.firmware_updated(self.settings, config, now=now, msg_id=self._new_id()), now
            )
        elif self.settings.lifecycle is not State.FACTORY_NEW:
            self.carry_out(Plan(self.settings), now)

    def _enter_safe_mode(self, exc: StorageError) -> None:
        """Started on a full, read-only or damaged store: nothing personal is captured
        or sent, pending deletion requests still go (P10), and ``settle`` opens the
        store again once it can."""
        self.safe_mode = True
        self.health.problem = exc
        self.settings = Settings.fresh(self.config.policy_version, Control.unreadable())
        self.handoff.queued = 0
        log.error(
            "safe mode: the store cannot be used; nothing personal is captured or sent",
            extra={"device": self.store.device_id, "kind": exc.kind, "error": str(exc)},
        )

    def _load_control(self) -> Control:
        try:
            raw = self.store.load_control()
        except TamperedRecord:
            # Fail closed: collection stays suspended until the cloud resumes it (P13).
            return Control.unreadable()
        return Control() if raw is None else Control.from_json(raw)

    def decided_on(self, now: float) -> Settings:
        """The settings a user's or the cloud's action is decided on. In safe mode they
        are a placeholder, not the device's: the action fails with the store's error
        (reported to the user; a cloud command is not acknowledged and comes again)
        rather than being decided on, and lost with, the placeholder."""
        if self.safe_mode and not self.settle(now=now):
            assert self.health.problem is not None  # noqa: S101  # settle sets it
            raise self.health.problem
        return self.settings

    def carry_out(
        self, plan: Plan, now: float, *, also: Callable[[], None] | None = None
    ) -> Removed:
        """Write ``plan`` in one transaction, then stop what may not leave and tell observers.

        Returns what the plan removed from the outbox. When the write fails a narrowing
        plan still takes effect in memory, everything personal stays stopped until it is
        durable (``settle``), and the StorageError is raised for the caller to report; any
        other plan changes nothing, and a capture is dropped and counted. ``also`` is a
        write of the caller's that commits with the plan's, or not at all.
        """
        handoff = self.handoff
        if plan.stop:
            # Before anything is written: the transport stops these purposes first, so a
            # failed write leaves them stopped rather than leaving (fail closed).
            handoff.tell_stopped(plan.stop)
        try:
            if self.unsettled and not self.settle(now=now):
                assert self.health.problem is not None  # noqa: S101  # settle sets it
                raise self.health.problem
            if plan.wipe is not None:
                self.unsettled_plans.clear()  # the wipe supersedes them
                self.settings = plan.settings
                return Removed({DropReason.WIPED: self.wipe.start(plan)})
            settings = plan.settings
            if plan.save:  # the record names the firmware that wrote it
                settings = dataclasses.replace(
                    settings, firmware_version=self.config.firmware_version
                )
            removed = self.health.durably(
                lambda: self._write(plan, settings, also=also), narrowing=plan.narrows
            )
        except StorageError as exc:
            self._failed(plan, exc)
            raise
        self.settings = settings
        if plan.capture is not None:  # counted before the drops its cap may have caused
            handoff.queued += 1
        self._account(removed)
        if (c := plan.capture) is not None:
            handoff.tell_queued(c.msg_id, c.purpose, c.captured_at)
        if plan.capture is not None or (plan.save and not plan.stop) or plan.recoarsen:
            handoff.tell_sendable()
        return removed

    def _account(self, removed: Removed) -> None:
        """Count what a plan's write removed: the rows it deleted, and the items whose
        key it shredded (unreadable from now on; the observers hear of each when the
        reaper deletes its row)."""
        for reason, shredded in removed.shredded.items():
            self.handoff.shredded(reason, shredded)
        for reason, msg_ids in removed.deleted.items():
            self.handoff.drop(msg_ids, reason)

    def _failed(self, plan: Plan, exc: StorageError) -> None:
        """A plan's write failed: fail closed, and say so."""
        if plan.capture is not None:
            self.handoff.dropped[DropReason.STORAGE] += 1
        if plan.narrows and plan.wipe is None and plan not in self.unsettled_plans:
            # In force in memory from now on; written by ``settle``.
            self.unsettled_plans.append(plan)
            self.settings = plan.settings
        if self.unsettled:
            self.handoff.tell_stopped(PERSONAL)
        self.health.failed(
            "storage write failed",
            exc,
            narrowing=plan.narrows,
            capture_dropped=plan.capture is not None,
            personal_stopped=self.unsettled,
        )

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
                log.info(
                    "store usable again: safe mode ends", extra={"device": self.store.device_id}
                )
            if self.wipe.pending is not None:
                self.wipe.finish()
            while self.unsettled_plans:
                plan = self.unsettled_plans[0]
                removed = self.health.durably(
                    lambda plan=plan: self._write(plan, plan.settings, control=True),  # type: ignore[misc]
                    narrowing=True,
                )
                self.unsettled_plans.pop(0)
                self._account(removed)
            self.handoff.record_all()
        except StorageError as exc:
            self.health.problem = exc
            return False
        self.health.problem = None
        self.store.db.ensure_reserve()
        self.handoff.tell_sendable()
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
        store = self.store
        with store.db.transaction():
            for purge in plan.purge:
                if purge.before is not None:
                    # Only what was captured before a later change (SPEC §3): the rows go,
                    # in flight or not (a PUBACK may still come for those; it is ledgered).
                    drops.setdefault(purge.reason, []).extend(
                        store.purge_older_than(purge.purpose, purge.before)
                    )
                    continue
                # In flight: deleted now (a PUBACK may still come; it is ledgered). The
                # rest: their item key is destroyed, whatever their number (P2).
                gone = store.delete_items(self.handoff.in_flight(purge.purpose))
                shredded, legacy = store.shred_purpose(purge.purpose, purge.reason.value)
                drops.setdefault(purge.reason, []).extend(gone + legacy)
                removed.shredded[purge.reason] = removed.shredded.get(purge.reason, 0) + shredded
            for change in plan.recoarsen:
                store.rewrite(
                    Purpose.ACTIVATION,
                    functools.partial(rules.recoarsened, precision=change.precision),
                    before=change.before,
                )
            if also is not None:
                also()
            if plan.capture is not None:
                c = plan.capture
                store.enqueue(c.msg_id, c.purpose, c.captured_at, c.payload)
                excess = overflow(self.handoff.queued + 1, self.config.outbox_cap)
                if excess:
                    drops[DropReason.CAPACITY] = store.purge_oldest(excess)
            for entry in plan.ledger:
                store.append_ledger(entry)
            if plan.save:
                store.save_state(settings.to_json())
            if control or settings.control != self.settings.control:
                store.save_control(settings.control.to_json())
        return removed
