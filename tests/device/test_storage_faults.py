"""Fail closed when the store refuses a write (read-only, full, failing), without a mount."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.core.consent import Reason
from agent.core.items import DropReason
from agent.core.purposes import Purpose
from agent.device import CrashReport
from agent.errors import StorageError
from agent.store.records import DeviceStore
from tests.device.helpers import Recorder, Rig, granted_rig

D = Purpose.DIAGNOSTICS


def refuse(monkeypatch: pytest.MonkeyPatch, *methods: str) -> None:
    """Make these store methods fail as a read-only file system would."""

    def fail(*_a: Any, **_k: Any) -> Any:
        raise StorageError("state.db: attempt to write a readonly database", kind="read-only")

    for name in methods:
        monkeypatch.setattr(DeviceStore, name, fail)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = granted_rig(tmp_path, D)
    assert r.core is not None
    for _ in range(3):
        r.core.capture_crash(CrashReport("s", "x"), now=r.tick())
    return r


def test_a_withdrawal_that_cannot_be_written_stops_everything_until_it_is(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = rig.core
    assert core is not None
    seen = Recorder()
    core.watch(seen)
    with monkeypatch.context() as m:
        refuse(m, "shred_purpose", "save_state")
        with pytest.raises(StorageError, match="readonly"):
            core.withdraw(D, now=rig.tick())
        # In force in memory: nothing personal is captured or handed over.
        assert core.decide(D).reason is Reason.NOT_DURABLE
        assert core.decide(Purpose.ACTIVATION).reason is Reason.NOT_DURABLE
        assert core.next_batch(now=rig.tick()) == []
        assert seen.stops[-1] == frozenset(Purpose)
        assert core.status()["storage"]["narrowing_not_durable"] == 1
        assert core.settle(now=rig.tick()) is False
    # The store takes writes again: the withdrawal becomes durable, as if never delayed.
    assert core.settle(now=rig.tick()) is True
    assert core.queued_count() == 0
    assert core.status()["storage"]["ok"] is True
    assert core.decide(D).reason is Reason.NOT_GRANTED
    core = rig.open()  # and it survives a restart
    assert core.decide(D).reason is Reason.NOT_GRANTED
    assert core.store.count() == 0


def test_a_wipe_whose_rows_cannot_be_deleted_is_in_force_and_finished_later(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = rig.core
    assert core is not None
    with monkeypatch.context() as m:
        refuse(m, "finish_wipe")
        with pytest.raises(StorageError):
            core.unbind(now=rig.tick())
        assert core.lifecycle.value == "factory-new"
        assert core.status()["storage"]["wipe_pending"] is True
        # A bind in the meantime is refused; nothing is sealed under a new key.
        with pytest.raises(StorageError):
            core.bind("owner-2", now=rig.tick())
        assert core.store.keys.load("dev-1.data") is not None  # the old key, not yet shred
    assert core.settle(now=rig.tick()) is True
    assert core.store.keys.load("dev-1.data") is None
    assert core.store.count() == 0
    sent = rig.deliver_all()
    assert [o.kind for o in sent] == ["deletion-request"]


def test_a_capture_that_cannot_be_stored_is_dropped_and_counted(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = rig.core
    assert core is not None
    with monkeypatch.context() as m:
        refuse(m, "enqueue")
        with pytest.raises(StorageError):
            core.capture_crash(CrashReport("s", "x"), now=rig.tick())
    assert core.dropped[DropReason.STORAGE] == 1
    assert core.queued_count() == 3
    assert len(rig.deliver_all()) == 3  # nothing half-written, the rest unharmed


def test_no_new_data_key_while_a_wipe_is_unfinished(rig: Rig) -> None:
    core = rig.core
    assert core is not None
    store = core.store
    store.begin_wipe("unbind", None)
    store.keys.destroy("dev-1.data")  # a wipe cut short after the key was destroyed
    store._sealing.forget_data()  # as after a restart
    with pytest.raises(StorageError, match="a wipe is not finished"):
        store.enqueue("late", D, rig.tick(), b"{}")
    assert store.keys.load("dev-1.data") is None
