"""P2 by crypto-shredding: a withdrawal destroys its purpose's item key in one small
durable write, whatever the number of pending items; the reaper deletes the rows later,
and the promise holds if the process dies in between."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.core.items import DropReason
from agent.core.purposes import Purpose
from agent.device import CrashReport
from agent.errors import StorageError
from agent.store.keys import FileKeyStore
from tests.device.helpers import Recorder, Rig, granted_rig

D, A = Purpose.DIAGNOSTICS, Purpose.ACTIVATION
CRASH = CrashReport(signature="SIGSEGV in fan_ctl", stack='File "fan.py", line 3')


def fill(rig: Rig, n: int) -> list[str]:
    core = rig.core
    assert core is not None
    with core.store.db.transaction():
        return [core.capture_crash(CRASH, now=rig.tick(0.001)) for _ in range(n)]


def rows(rig: Rig) -> list[tuple[str, str, int, bytes]]:
    """The outbox rows as they are in the file, whatever the agent thinks of them."""
    conn = sqlite3.connect(rig.root / "state.db")
    try:
        return conn.execute("SELECT msg_id, purpose, captured_ms, blob FROM outbox").fetchall()
    finally:
        conn.close()


def opens_with_any_key(rig: Rig, row: tuple[str, str, int, bytes]) -> bool:
    """Whether any key left on the card decrypts the row (an attacker with the card,
    who knows the record format)."""
    assert rig.core is not None
    msg_id, purpose, cms, blob = row
    aad = rig.core.store._outbox._item_aad(msg_id, purpose, cms)
    nonce, body = blob[1:13], blob[13:]
    for path in (rig.root / "keys").glob("*.key"):
        try:
            AESGCM(path.read_bytes()).decrypt(nonce, body, aad)
        except (InvalidTag, ValueError):
            pass
        else:
            return True
    return False


def test_a_withdrawal_shreds_the_key_and_the_reaper_deletes_the_rows(tmp_path: Path) -> None:
    rig = granted_rig(tmp_path, D)
    core = rig.core
    assert core is not None
    seen = Recorder()
    core.watch(seen)
    ids = fill(rig, 200)
    assert len(list((rig.root / "keys").glob("*.item.*.key"))) == 1
    assert all(opens_with_any_key(rig, row) for row in rows(rig))  # the check can tell
    assert core.withdraw(D, now=rig.tick()) == 200
    # Before any reaping: the key file is gone, no item is queued, and no key left on
    # the card opens any of the rows that wait for the reaper.
    assert not list((rig.root / "keys").glob("*.item.*.key"))
    assert core.queued_count() == 0
    assert core.store.queued(1000) == []
    left = rows(rig)
    assert len(left) == 200
    assert not any(opens_with_any_key(rig, row) for row in left)
    assert core.next_batch(now=rig.tick()) == []  # and it reaps a batch meanwhile
    assert rows(rig) == []
    core.reap_all()
    assert rows(rig) == []
    assert sorted(seen.dropped_ids) == sorted(ids)
    assert set(seen.reasons) == {DropReason.WITHDRAWN}
    assert core.dropped[DropReason.WITHDRAWN] == 200  # counted once, when shredded


def test_a_process_that_dies_before_the_reaper_sends_nothing_after_restart(
    tmp_path: Path,
) -> None:
    rig = granted_rig(tmp_path, D)
    core = rig.core
    assert core is not None
    fill(rig, 50)
    core.withdraw(D, now=rig.tick())
    assert len(rows(rig)) == 50  # killed here: nothing reaped yet
    core = rig.open()
    assert core.queued_count() == 0
    core.grant(D, now=rig.tick())  # a new grant: a new key; the old items stay dead
    fresh = core.capture_crash(CRASH, now=rig.tick())
    assert [o.msg_id for o in rig.deliver_all()] == [fresh]
    core.reap_all()
    assert rows(rig) == []


def test_a_key_that_could_not_be_destroyed_is_destroyed_by_the_next_reap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = granted_rig(tmp_path, D)
    core = rig.core
    assert core is not None
    fill(rig, 10)
    real = FileKeyStore.destroy

    def failing(self: FileKeyStore, name: str) -> None:
        raise StorageError(f"{name}: input/output error", kind="io")

    monkeypatch.setattr(FileKeyStore, "destroy", failing)
    assert core.withdraw(D, now=rig.tick()) == 10  # in force: the mark is durable
    assert core.store.queued(100) == []
    assert len(list((rig.root / "keys").glob("*.item.*.key"))) == 1
    monkeypatch.setattr(FileKeyStore, "destroy", real)
    core.reap_all()
    assert not list((rig.root / "keys").glob("*.item.*.key"))
    assert rows(rig) == []


def test_other_purposes_and_new_grants_are_untouched(tmp_path: Path) -> None:
    rig = granted_rig(tmp_path, D)
    core = rig.core
    assert core is not None
    core.grant(A, now=rig.tick())
    fill(rig, 5)
    core.withdraw(A, now=rig.tick())  # nothing of A was queued
    assert core.queued_count() == 5
    core.withdraw(D, now=rig.tick())
    core.grant(D, now=rig.tick())
    kept = fill(rig, 3)
    assert core.queued_count() == 3
    assert sorted(o.msg_id for o in rig.deliver_all()) == sorted(kept)


def test_a_store_from_before_item_keys_is_upgraded_and_its_rows_still_withdraw(
    tmp_path: Path,
) -> None:
    rig = granted_rig(tmp_path, D)
    core = rig.core
    assert core is not None
    ids = fill(rig, 4)
    rig.db.close() if rig.db is not None else None
    # As an earlier version left it: no key_id column, rows sealed with the data key.
    conn = sqlite3.connect(rig.root / "state.db")
    conn.execute("DELETE FROM outbox")
    conn.execute("DROP TABLE item_keys")
    conn.execute("DROP INDEX outbox_by_key")
    conn.execute("ALTER TABLE outbox DROP COLUMN key_id")
    conn.commit()
    conn.close()
    rig.db = None
    core = rig.open()
    with core.store.db.transaction() as c:
        vault = core.store._sealing.data_vault()
        for n, msg_id in enumerate(ids):
            aad = core.store._outbox._item_aad(msg_id, D.value, 1000 + n)
            c.execute(
                "INSERT INTO outbox (device_id, msg_id, purpose, captured_ms, blob) "
                "VALUES (?, ?, ?, ?, ?)",
                (core.device_id, msg_id, D.value, 1000 + n, vault.seal(b"{}", aad)),
            )
    core = rig.open()
    assert core.queued_count() == 4
    assert core.withdraw(D, now=rig.tick()) == 4
    assert rows(rig) == []  # sealed with the data key: deleted at once


def test_the_mark_outlives_every_row_of_its_key_whatever_the_count_says(tmp_path: Path) -> None:
    rig = granted_rig(tmp_path, D)
    core = rig.core
    assert core is not None
    fill(rig, 50)
    core.withdraw(D, now=rig.tick())
    for key_id in list(core.store._outbox._rows):
        core.store._outbox._rows[key_id] = 0  # a count gone wrong must not orphan rows
    assert core.reap(10) == 10
    assert core.store.shredded_pending()
    core.reap_all()
    assert rows(rig) == []
    assert not core.store.shredded_pending()
