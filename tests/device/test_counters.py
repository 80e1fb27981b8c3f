"""The rollback counters of a simulated fleet's key store: kept in memory, written by
``flush``, and still catching a rolled-back store once written."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.purposes import Purpose
from agent.device import CoreConfig, Device, build_device
from agent.errors import StorageError
from agent.store.database import Database
from agent.store.keys import FileKeyStore


def test_a_fleets_counters_are_written_at_flush_and_read_back(tmp_path: Path) -> None:
    keys = FileKeyStore(tmp_path / "keys", durable=False)
    keys.advance("d.state", 3)
    keys.advance("d.state", 2)  # never down
    assert keys.counter("d.state") == 3
    assert not (tmp_path / "keys" / "d.state.counter").exists()  # not per save
    assert keys.flush() == 1
    assert keys.flush() == 0
    assert FileKeyStore(tmp_path / "keys").counter("d.state") == 3  # as the next run reads it


def test_a_fleet_reads_each_counter_file_once(tmp_path: Path) -> None:
    FileKeyStore(tmp_path / "keys").advance("d.state", 4)
    keys = FileKeyStore(tmp_path / "keys", durable=False)
    assert keys.counter("d.state") == 4
    assert keys.counter("d.never") == 0
    (tmp_path / "keys" / "d.state.counter").unlink()
    (tmp_path / "keys" / "d.never.counter").write_text("9")
    assert (keys.counter("d.state"), keys.counter("d.never")) == (4, 0)  # not read again
    assert keys.flush() == 0  # nothing advanced: nothing to write


def test_a_device_keeps_its_counters_written_at_once(tmp_path: Path) -> None:
    keys = FileKeyStore(tmp_path / "keys")
    keys.advance("d.state", 5)
    assert (tmp_path / "keys" / "d.state.counter").read_text() == "5"


def test_a_failed_flush_keeps_the_counter_for_the_next(tmp_path: Path) -> None:
    keys = FileKeyStore(tmp_path / "keys", durable=False)
    keys.advance("d.state", 7)
    (tmp_path / "keys").write_text("in the way")  # a file where the directory goes
    with pytest.raises(StorageError):
        keys.flush()
    (tmp_path / "keys").unlink()
    assert keys.flush() == 1
    assert FileKeyStore(tmp_path / "keys").counter("d.state") == 7


def test_a_rolled_back_fleet_store_is_found_out_after_a_flush(tmp_path: Path) -> None:
    def open_device(keys: FileKeyStore) -> tuple[Database, Device]:
        db = Database(tmp_path / "fleet.db", synchronous="NORMAL")
        return db, build_device(db, keys, CoreConfig("sim-1", "S", "m", "1"), now=1e9)

    keys = FileKeyStore(tmp_path / "keys", durable=False)
    db, device = open_device(keys)
    device.bind("b", now=1e9)
    device.grant(Purpose.DIAGNOSTICS, now=1e9 + 1)
    db.checkpoint()
    old = (tmp_path / "fleet.db").read_bytes()  # a copy while consent was in force
    device.withdraw(Purpose.DIAGNOSTICS, now=1e9 + 2)
    db.close()
    keys.flush()
    for leftover in tmp_path.glob("fleet.db-*"):
        leftover.unlink()
    (tmp_path / "fleet.db").write_bytes(old)
    _db, device = open_device(FileKeyStore(tmp_path / "keys", durable=False))
    assert not device.decide(Purpose.DIAGNOSTICS).allowed
    assert any("rolled back" in p.reason for p in device.store.problems)
