"""A device: its verbs, what it shows, and the parts that carry them out.

Events go to ``agent.core.rules``, which decides; ``Plans`` writes each plan, ``Wipe``
carries out a wipe, ``HandOff`` gives the transport what may leave and follows each
item from there. Callers pass ``now``; the daemon, the CLI and the simulator drive it.
Observers (``DeviceObserver``) are the transport (what may no longer leave, what became
sendable) and the simulator's ground truth (what was queued, acknowledged, dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.core import cloud, ledger, rules
from agent.core.commands import Command
from agent.core.consent import ConsentState, Decision, Reason, Source
from agent.core.items import DropReason, Outgoing
from agent.core.lifecycle import Event, State
from agent.core.location import CoarseLocation, Precision
from agent.core.ordering import Clock
from agent.core.purposes import Purpose
from agent.core.settings import CoreConfig, CrashReport, Settings
from agent.device import status
from agent.device.handoff import DeviceObserver, HandOff
from agent.device.health import Health
from agent.device.plans import Plans
from agent.device.wipe import Wipe
from agent.errors import StorageError
from agent.store.crash_files import CrashFiles
from agent.store.records import DeviceStore

log = logging.getLogger("smartmi.device")


def new_msg_id() -> str:
    """A fresh random message ID."""
    return uuid.uuid4().hex


class Device:
    """One device: its rules, its store, and what it has handed to the transport."""

    def __init__(
        self,
        store: DeviceStore,
        config: CoreConfig,
        *,
        now: float,
        crash_dirs: Sequence[Path] = (),
        new_id: Callable[[], str] = new_msg_id,
    ) -> None:
        self.store = store
        self._crash_files = CrashFiles(store.db, store.device_id)
        self._new_id = new_id
        self.health = Health(store)
        self.handoff = HandOff(store, self.health)
        self.plans = Plans(
            store,
            config,
            self.handoff,
            self.health,
            Wipe(store, self.handoff, self.health, crash_dirs),
            new_id=new_id,
        )
        self.plans.open(now)

    def watch(self, observer: DeviceObserver) -> None:
        """Tell ``observer`` from now on what changes."""
        self.handoff.observers.append(observer)

    # -- views -------------------------------------------------------------
    @property
    def config(self) -> CoreConfig:
        """The configuration the rules decide with."""
        return self.plans.config

    @property
    def settings(self) -> Settings:
        """The settings in force (in memory: some may not be durable yet)."""
        return self.plans.settings

    @property
    def dropped(self) -> dict[DropReason, int]:
        """How many items left the outbox unsent, by reason."""
        return self.handoff.dropped

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
        return self.health.problem is not None or self.unsettled or bool(self.handoff.unrecorded)

    @property
    def unsettled(self) -> bool:
        """Whether a narrowing, a wipe or the store itself is not yet settled on disk."""
        return self.plans.unsettled

    def settle(self, *, now: float) -> bool:
        """Make durable what is in force only in memory: a safe-mode store, a wipe,
        narrowing plans, acknowledgements. True when nothing is left unsettled."""
        return self.plans.settle(now=now)

    def queued_count(self) -> int:
        """How many items wait in the outbox (not counting deletion requests)."""
        self.handoff.count_quarantined()
        return self.handoff.queued

    # -- lifecycle ---------------------------------------------------------
    def bind(self, binding_id: str, *, now: float, minor: bool = False) -> None:
        """Bind to an owner; an activation becomes due (first, or restore after a wipe)."""
        plan = rules.bind(
            self.plans.decided_on(now),
            self.config,
            binding_id,
            minor=minor,
            restored=self.store.wipe_count() > 0,
            now=now,
            msg_id=self._new_id(),
        )
        self.plans.carry_out(plan, now)

    def firmware_updated(self, version: str, *, now: float) -> None:
        """A new firmware runs: a fresh activation is due if the device is bound."""
        self.plans.config = dataclasses.replace(self.config, firmware_version=version)
        plan = rules.firmware_updated(
            self.plans.decided_on(now), self.config, now=now, msg_id=self._new_id()
        )
        self.plans.carry_out(plan, now)

    def set_policy_version(self, version: str, *, now: float) -> None:
        """The configured privacy policy changed: earlier grants stop counting (P6)."""
        self.plans.config = dataclasses.replace(self.config, policy_version=version)
        plan = rules.policy_changed(
            self.plans.decided_on(now), self.config, now=now, msg_id=self._new_id()
        )
        self.plans.carry_out(plan, now)

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
        plan = rules.wipe(
            self.plans.decided_on(now), self.config, event, now=now, msg_id=self._new_id()
        )
        self.plans.carry_out(plan, now)
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
            self.plans.decided_on(now),
            self.config,
            purpose,
            now=now,
            source=source,
            msg_id=self._new_id(),
        )
        self.plans.carry_out(plan, now)
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
        plan = rules.withdraw(
            self.plans.decided_on(now), self.config, purpose, now=now, source=source
        )
        removed = self.plans.carry_out(plan, now).count(DropReason.WITHDRAWN)
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
        settings = self.plans.decided_on(now)
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
        self.plans.carry_out(plan, now)

    # -- cloud commands and the clock ------------------------------------------
    def take(self, command: Command, *, now: float) -> cloud.Taken:
        """Carry out a cloud command (SPEC §3); durable when this returns.

        Raises CommandRejected when the command may not be taken at all.
        """
        taken = cloud.take(
            self.plans.decided_on(now), self.config, command, now=now, msg_id=self._new_id()
        )
        self.plans.carry_out(taken.plan, now)
        return taken

    def clock_compared(self, clock: Clock, *, now: float) -> None:
        """The command sync measured the device clock against the cloud's (SPEC §3).

        Kept in memory when the store refuses it: it only orders later choices, and a
        restart forgets it (the order is then unknown, and narrowing wins).
        """
        plan = rules.clock_compared(self.settings, clock)
        try:
            self.plans.carry_out(plan, now)
        except StorageError:
            self.plans.settings = plan.settings

    # -- location ----------------------------------------------------------
    def set_precision(self, precision: Precision, *, now: float) -> None:
        """Change the location precision; a stored location can only get coarser (P3)."""
        self.plans.carry_out(
            rules.set_precision(self.plans.decided_on(now), precision, now=now), now
        )

    def set_location(self, lat: float, lon: float, *, now: float) -> CoarseLocation | None:
        """Take a position; it is coarsened on entry, the exact value is never kept (P3)."""
        self.plans.carry_out(rules.set_location(self.plans.decided_on(now), lat, lon), now)
        return self.settings.location

    # -- capture -----------------------------------------------------------
    def capture_crash(self, report: CrashReport, *, now: float) -> str:
        """Queue crash diagnostics if diagnostics consent is in force; return the msg_id."""
        plan = rules.crash(
            self.plans.decided_on(now), self.config, report, now=now, msg_id=self._new_id()
        )
        self.plans.carry_out(plan, now)
        assert plan.capture is not None  # noqa: S101  # rules.crash raises otherwise
        return plan.capture.msg_id

    def capture_crash_file(self, report: CrashReport, *, now: float, msg_id: str) -> None:
        """``capture_crash`` of a crash file claimed as ``msg_id``, with the note that it
        was captured in the capture's own transaction (``crash_file_captured``)."""
        plan = rules.crash(self.plans.decided_on(now), self.config, report, now=now, msg_id=msg_id)
        self.plans.carry_out(plan, now, also=functools.partial(self._crash_files.note, msg_id))

    def crash_file_captured(self, msg_id: str) -> bool:
        """Whether the crash file claimed as ``msg_id`` was captured before."""
        return self._crash_files.captured(msg_id)

    def crash_file_gone(self, msg_id: str) -> None:
        """The crash file claimed as ``msg_id`` is deleted: forget its note."""
        self._crash_files.forget(msg_id)

    # -- hand-off to the transport (``HandOff``) -----------------------------
    def next_batch(self, *, now: float, limit: int = 32, personal: bool = True) -> list[Outgoing]:
        """Items to publish now, marked in flight: deletion requests first, then the outbox.

        Items past retention are deleted first and never returned (P7); an item is
        returned only if the gate allows its purpose now (P1, P2, P6). With
        ``personal`` false only deletion requests are returned (commands first).
        """
        if self.needs_settling:
            self.settle(now=now)
        allowed = frozenset(p for p in Purpose if personal and self.decide(p).allowed)
        return self.handoff.next_batch(self.settings, allowed, now=now, limit=limit)

    def in_flight(self) -> list[str]:
        """msg_ids handed to the transport and not yet acknowledged."""
        return self.handoff.in_flight()

    def flight(self, msg_id: str) -> Outgoing | None:
        """The item handed off as ``msg_id``, while the device holds it."""
        held = self.handoff.flights.get(msg_id)
        return None if held is None else held.out

    def acknowledged(self, msg_id: str, *, now: float) -> bool:
        """The broker acknowledged ``msg_id``: remove it and ledger it, atomically.
        False when it was not in flight (recalled, forgotten by a wipe, unknown)."""
        return self.handoff.acknowledged(msg_id, now=now)

    def give_back(self, msg_ids: list[str]) -> None:
        """Items from ``next_batch`` that were never handed over wait again, quietly."""
        self.handoff.give_back(msg_ids)

    def retry(self, msg_id: str) -> None:
        """A hand-off failed (connection lost, PUBACK refused): the item waits again."""
        self.handoff.retry(msg_id)

    def connection_lost(self, *, now: float) -> None:
        """In-flight items are queued again; recalled ones are ledgered unconfirmed."""
        self.handoff.connection_lost(now=now)

    def sweep_retention(self, *, now: float) -> int:
        """Delete every queued item past its purpose's retention (P7); how many."""
        return self.handoff.sweep_retention(now=now)

    def reap(self, limit: int = 512) -> int:
        """Delete up to ``limit`` rows of shredded items; how many went."""
        return self.handoff.reap(limit)

    def reap_all(self) -> int:
        """Reap until nothing shredded is left (tests, and before a run's end)."""
        return self.handoff.reap_all()

    # -- P11 ---------------------------------------------------------------
    def export(self, *, now: float) -> dict[str, Any]:
        """The ledger as the JSON document a user receives."""
        return ledger.export(self.device_id, self.store.ledger(), now=now)

    def status(self) -> dict[str, Any]:
        """A summary for the CLI and the control socket (no personal values)."""
        return status.summary(self)

    def storage_status(self) -> dict[str, Any]:
        """The store's health as ``status`` shows it; ``ok`` false while anything is
        not durable or the last write failed."""
        return status.storage(self)
