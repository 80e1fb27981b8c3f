"""The wipe (P9): in memory first, then a journal with the deletion request, then key,
rows and crash files; each durable step may be repeated, by ``settle`` or, after a
crash, by the next open (the journal)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.core.rules import Plan
from agent.device.handoff import HandOff
from agent.device.health import Health
from agent.errors import StorageError
from agent.store import faults
from agent.store.records import DeviceStore


class Wipe:
    """One device's wipe: started by a wipe plan, finished once every step is durable."""

    def __init__(
        self, store: DeviceStore, handoff: HandOff, health: Health, crash_dirs: Sequence[Path]
    ) -> None:
        self.store = store
        self.handoff = handoff
        self.health = health
        self.crash_dirs = tuple(crash_dirs)
        self.pending: Plan | None = None  # a wipe in force in memory, not yet all on disk
        self._journaled = False

    def start(self, plan: Plan) -> list[str]:
        """Nothing personal leaves from here on, whatever the disk does; then the
        durable steps (``finish``). Returns the msg_ids of the items it destroyed."""
        # Everything personal that the transport still holds must go too. An item in
        # flight keeps its outbox row until acknowledged, so the rows name them all.
        try:
            self.handoff.reap_all()  # shredded rows first: observers hear of them as shredded
            doomed = self.store.msg_ids()
        except StorageError:
            doomed = [
                m
                for m in self.handoff.in_flight()
                if (h := self.handoff.flights.get(m)) is not None and h.out.purpose is not None
            ]
        self.pending, self._journaled = plan, False
        self.handoff.wiped(doomed)
        self.finish()
        return doomed

    def finish(self) -> None:
        """The wipe's durable steps; each one may be repeated."""
        plan = self.pending
        assert plan is not None  # noqa: S101  # only a started wipe is finished
        wipe = plan.wipe
        assert wipe is not None  # noqa: S101  # only wipe plans are pending
        if not self._journaled:

            def journal() -> None:
                with self.store.db.transaction():
                    if wipe.journal:
                        self.store.begin_wipe(wipe.reason, wipe.deletion_request)
                    self.store.save_control(plan.settings.control.to_json())

            self.health.durably(journal, narrowing=True)
            self._journaled = True
        self.health.durably(self.store.finish_wipe, narrowing=True)
        for crash_dir in self.crash_dirs:
            if not crash_dir.is_dir():
                continue
            try:
                for crash_file in crash_dir.iterdir():
                    if not crash_file.is_dir():
                        crash_file.unlink()  # a link goes, never what it points at
            except OSError as exc:
                raise faults.mapped(exc, crash_dir) from exc
        self.pending = None
        if wipe.deletion_request is not None:
            self.handoff.deletions_maybe = True
            self.handoff.tell_sendable()
