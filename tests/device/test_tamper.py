"""Tampered, truncated, swapped or keyless records are detected, quarantined and never sent."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.core.items import Outgoing
from agent.core.purposes import Purpose, parse_envelope, rfc3339
from agent.device import CrashReport, Device
from agent.errors import StorageError
from agent.store.database import Database
from tests.device.helpers import Rig

CRASH = CrashReport(signature="boom", stack="trace")


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    core = r.open()
    core.bind("b", now=r.tick())
    core.grant(Purpose.DIAGNOSTICS, now=r.tick())
    for _ in range(3):
        core.capture_crash(CRASH, now=r.tick())
    assert r.db is not None
    r.db.close()
    r.db = None
    return r


def _edit(rig: Rig, sql: str, *args: object) -> None:
    with sqlite3.connect(rig.root / "state.db") as c:
        c.execute(sql, args)


def _first_blob(rig: Rig, table: str = "outbox") -> tuple[int, bytes]:
    with sqlite3.connect(rig.root / "state.db") as c:
        row = c.execute(f"SELECT rowid, blob FROM {table} ORDER BY rowid LIMIT 1").fetchone()  # noqa: S608
    return int(row[0]), bytes(row[1])


def test_flipped_bit(rig: Rig) -> None:
    rowid, blob = _first_blob(rig)
    flipped = bytearray(blob)
    flipped[20] ^= 0x01
    _edit(rig, "UPDATE outbox SET blob = ? WHERE rowid = ?", bytes(flipped), rowid)
    core = rig.open()
    sent = rig.deliver_all()
    assert len(sent) == 2
    assert core.store.quarantined() == 1
    assert core.store.problems[0].table == "outbox"


def test_truncated(rig: Rig) -> None:
    rowid, blob = _first_blob(rig)
    _edit(rig, "UPDATE outbox SET blob = ? WHERE rowid = ?", blob[:10], rowid)
    core = rig.open()
    assert len(rig.deliver_all()) == 2
    assert "truncated" in core.store.problems[0].reason


def test_swapped_rows(rig: Rig) -> None:
    with sqlite3.connect(rig.root / "state.db") as c:
        (a, ba), (b, bb) = c.execute("SELECT rowid, blob FROM outbox LIMIT 2").fetchall()
        c.execute("UPDATE outbox SET blob = ? WHERE rowid = ?", (bb, a))
        c.execute("UPDATE outbox SET blob = ? WHERE rowid = ?", (ba, b))
    core = rig.open()
    assert len(rig.deliver_all()) == 1
    assert core.store.quarantined() == 2


def test_edited_plaintext_column(rig: Rig) -> None:
    rowid, _ = _first_blob(rig)
    _edit(rig, "UPDATE outbox SET captured_ms = captured_ms + 1 WHERE rowid = ?", rowid)
    core = rig.open()
    assert len(rig.deliver_all()) == 2
    assert core.store.quarantined() == 1


def test_tampered_state_record_sends_nothing(rig: Rig) -> None:
    rowid, blob = _first_blob(rig, "state")
    _edit(rig, "UPDATE state SET blob = ? WHERE rowid = ?", blob[:-1] + b"\0", rowid)
    core = rig.open()
    # Without its state, the device cannot show the consent its items were taken
    # under: nothing is sent, the state is quarantined, and the device is not bound.
    assert rig.deliver_all() == []
    assert core.queued_count() == 0
    assert core.store.quarantined() >= 1
    assert core.status()["lifecycle"] == "factory-new"


def test_missing_key(rig: Rig) -> None:
    (rig.root / "keys" / "dev-1.data.key").unlink()
    core = rig.open()
    assert rig.deliver_all() == []
    assert core.store.quarantined() == 4 + 1  # 3 items, 1 ledger entry, the state
    assert all(p.reason == "data key missing" for p in core.store.problems)


def test_a_corrupt_key_file_means_safe_mode_with_a_clear_error(rig: Rig) -> None:
    (rig.root / "keys" / "dev-1.data.key").write_bytes(b"short")
    core = rig.open()  # safe mode: it runs, says why, and nothing personal leaves
    status = core.status()["storage"]
    assert status["safe_mode"] is True
    assert status["kind"] == "corrupt"
    assert "dev-1.data.key is corrupt" in status["error"]
    assert not any(core.decide(p).allowed for p in Purpose)
    with pytest.raises(StorageError, match=r"dev-1\.data\.key is corrupt"):
        core.bind("owner-2", now=rig.tick())


def test_not_a_database_is_a_clear_error_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match=r"cannot be opened.*keep the file") as err:
        Database(path)
    assert err.value.kind == "corrupt"
    assert "move it aside" not in str(err.value)  # never advise discarding the store
    assert path.read_bytes() == b"this is not sqlite" * 100


def test_tampered_deletion_request_is_quarantined(rig: Rig) -> None:
    _unbound_offline(rig)
    rowid, blob = _first_blob(rig, "deletion_requests")
    _edit(rig, "UPDATE deletion_requests SET blob = ? WHERE rowid = ?", blob[:-2] + b"xx", rowid)
    core = rig.open()
    # Quarantined, and re-created from its journal copy (same msg_id): still sent once.
    assert [o.kind for o in rig.deliver_all()] == ["deletion-request"]
    assert core.store.problems[0].table == "deletion_requests"
    assert core.status()["deletion_requests_recreated"] == 1
    assert core.status()["deletion_requests_lost"] == 0


def _unbound_offline(rig: Rig) -> None:
    core = rig.open()
    core.unbind(now=rig.tick())
    assert rig.db is not None
    rig.db.close()
    rig.db = None


def test_a_deleted_deletion_request_is_recreated_loudly(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    _unbound_offline(rig)
    _edit(rig, "DELETE FROM deletion_requests")
    core = rig.open()
    assert [o.kind for o in rig.deliver_all()] == ["deletion-request"]
    assert core.status()["deletion_requests_recreated"] == 1
    assert "deletion request lost; re-created from its journal copy" in caplog.text


def _sent_request(sent: list[Outgoing]) -> dict[str, object]:
    assert [o.kind for o in sent] == ["deletion-request"]
    data = parse_envelope(sent[0].payload).data
    assert isinstance(data, dict)
    return data


def test_a_deletion_request_lost_with_its_copy_is_replaced_by_one_naming_the_device(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    _unbound_offline(rig)
    _edit(rig, "DELETE FROM deletion_requests")
    _edit(rig, "DELETE FROM deletion_journal")
    core = rig.open()
    first = core.next_batch(now=rig.now)
    core.give_back([o.msg_id for o in first])
    sent = rig.deliver_all()
    assert _sent_request(sent) == {
        "binding_id": None,
        "reason": "unknown",
        "requested_at": rfc3339(rig.now),
    }
    assert [o.msg_id for o in first] == [o.msg_id for o in sent]  # made once, kept
    assert core.status()["deletion_requests_lost"] == 1
    assert core.status()["deletion_requests_pending"] == 0
    assert "each is replaced by one naming the device only" in caplog.text
    rig.open()
    assert rig.deliver_all() == []  # acknowledged: not sent again


def test_a_stand_in_survives_a_restart_under_the_same_msg_id(rig: Rig) -> None:
    _unbound_offline(rig)
    _edit(rig, "DELETE FROM deletion_requests")
    _edit(rig, "DELETE FROM deletion_journal")
    core = rig.open()
    first = core.next_batch(now=rig.now)  # handed over, never acknowledged
    assert rig.db is not None
    rig.db.close()
    rig.db = None
    rig.open()
    assert [o.msg_id for o in rig.deliver_all()] == [o.msg_id for o in first]


@pytest.mark.parametrize("damage", [b"short", bytes(32)], ids=["wrong-size", "other-key"])
def test_a_damaged_system_key_still_leaves_the_full_deletion_request(
    rig: Rig, damage: bytes
) -> None:
    _unbound_offline(rig)
    key = rig.root / "keys" / "dev-1.system.key"
    key.write_bytes(damage)
    key.chmod(0o600)
    rig.open()
    # The journal copy has a key of its own: the binding is still known.
    data = _sent_request(rig.deliver_all())
    assert (data["binding_id"], data["reason"]) == ("b", "unbind")


def test_both_deletion_keys_damaged_still_leave_a_request_naming_the_device(rig: Rig) -> None:
    _unbound_offline(rig)
    for name in ("dev-1.system.key", "dev-1.deletions.key"):
        (rig.root / "keys" / name).write_bytes(bytes(32))
    rig.open()
    assert _sent_request(rig.deliver_all())["binding_id"] is None


def test_an_inserted_wipe_journal_is_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    _edit(rig, "INSERT INTO wipes (device_id, reason) VALUES ('dev-1', 'unbind')")
    rig.open()
    assert "an unfinished wipe was found in the journal" in caplog.text


def _restored_from_before_a_withdrawal(rig: Rig) -> Device:
    """Diagnostics withdrawn, then the state file copied while it was granted put back
    (a restored card): the device opened over it."""
    core = rig.open()
    assert rig.db is not None
    assert core.decide(Purpose.DIAGNOSTICS).allowed
    rig.db.checkpoint()
    old = (rig.root / "state.db").read_bytes()  # a copy while consent was in force
    core.withdraw(Purpose.DIAGNOSTICS, now=rig.tick())
    rig.db.close()
    rig.db = None
    for leftover in rig.root.glob("state.db-*"):
        leftover.unlink()
    (rig.root / "state.db").write_bytes(old)  # restored: items and grant are back
    return rig.open()


def test_a_rolled_back_store_brings_back_no_withdrawn_consent(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    core = _restored_from_before_a_withdrawal(rig)
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
    assert rig.deliver_all() == []
    assert any("rolled back" in p.reason for p in core.store.problems)
    assert "record failed its integrity check" in caplog.text


def test_after_a_rolled_back_store_a_new_grant_captures_and_sends_again(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The restored store names, as the purpose's live item key, a key the withdrawal
    destroyed (the rows it sealed went to quarantine as the store opened). A new grant
    must not stay stuck on it: the key is retired and a new one seals what comes next."""
    core = _restored_from_before_a_withdrawal(rig)  # its state fails its check: anew
    core.bind("b-2", now=rig.tick())
    core.grant(Purpose.DIAGNOSTICS, now=rig.tick())
    new = core.capture_crash(CRASH, now=rig.tick())
    assert core.queued_count() == 1  # the three restored rows are not queued
    assert [o.msg_id for o in rig.deliver_all()] == [new]
    assert core.queued_count() == 0
    assert "item key missing: its items moved to quarantine" in caplog.text


def test_a_lost_item_key_sends_its_rows_to_quarantine_and_a_new_one_seals_new_items(
    rig: Rig,
) -> None:
    """The live item key's file is gone (deleted, a card restored without it): the rows
    it sealed can never be opened. The next capture moves them all to quarantine, none
    left behind in the outbox, and seals the new item with a new key."""
    (key_file,) = (rig.root / "keys").glob("dev-1.item.*.key")
    key_file.unlink()
    core = rig.open()
    assert core.queued_count() == 3
    new = core.capture_crash(CRASH, now=rig.tick())
    assert core.queued_count() == 1
    assert [p.reason for p in core.store.problems].count("its item key is missing") == 3
    assert rig.db is not None
    assert rig.db.conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
    assert [o.msg_id for o in rig.deliver_all()] == [new]


def test_safe_mode_still_sends_a_pending_deletion_request(rig: Rig) -> None:
    _unbound_offline(rig)
    damaged = rig.root / "keys" / "dev-1.data.key"
    damaged.write_bytes(b"short")  # a damaged store
    damaged.chmod(0o600)
    core = rig.open()
    assert core.status()["storage"]["safe_mode"] is True
    assert [o.kind for o in rig.deliver_all()] == ["deletion-request"]
    assert core.status()["deletion_requests_pending"] == 0


def test_in_safe_mode_an_action_fails_with_the_stores_error_not_a_placeholder_verdict(
    rig: Rig,
) -> None:
    damaged = rig.root / "keys" / "dev-1.data.key"
    damaged.write_bytes(b"short")
    damaged.chmod(0o600)
    core = rig.open()
    # The device is bound with diagnostics granted; the placeholder is not: a withdrawal
    # decided on it would say "not bound" and be lost once the store opens again.
    actions: tuple[Callable[[], object], ...] = (
        lambda: core.withdraw(Purpose.DIAGNOSTICS, now=rig.tick()),
        lambda: core.grant(Purpose.ACTIVATION, now=rig.tick()),
    )
    for action in actions:
        with pytest.raises(StorageError, match=r"dev-1\.data\.key is corrupt"):
            action()


def test_a_second_loss_adds_one_stand_in_beside_the_first(rig: Rig) -> None:
    _unbound_offline(rig)
    _edit(rig, "DELETE FROM deletion_requests")
    _edit(rig, "DELETE FROM deletion_journal")
    core = rig.open()
    first = core.next_batch(now=rig.now)  # the first stand-in, handed over, not acknowledged
    core.give_back([o.msg_id for o in first])
    core.bind("b-2", now=rig.tick())
    core.unbind(now=rig.tick())  # a second request, lost with its copy too
    assert rig.db is not None
    rig.db.close()
    rig.db = None
    _edit(rig, "DELETE FROM deletion_requests")
    _edit(rig, "DELETE FROM deletion_journal")
    core = rig.open()
    sent = [o.msg_id for o in rig.deliver_all()]
    assert len(sent) == len(set(sent)) == 2  # each once: the first kept, one more made
    assert first[0].msg_id in sent
    assert core.status()["deletion_requests_lost"] == 1  # since this opening


@pytest.mark.parametrize(
    ("column", "value"),
    [("msg_id", "x" * 500), ("created_ms", "not a time"), ("msg_id", "")],
)
def test_a_damaged_stand_in_is_replaced_not_raised(
    rig: Rig, column: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    _unbound_offline(rig)
    _edit(rig, "DELETE FROM deletion_requests")
    _edit(rig, "DELETE FROM deletion_journal")
    core = rig.open()
    core.give_back([o.msg_id for o in core.next_batch(now=rig.now)])  # the stand-in is made
    assert rig.db is not None
    rig.db.close()
    rig.db = None
    with sqlite3.connect(rig.root / "state.db") as c:
        c.execute("CREATE TABLE t AS SELECT * FROM deletion_stand_ins")  # keep the shape
        c.execute("DELETE FROM deletion_stand_ins")
        c.execute(
            "INSERT INTO deletion_stand_ins (device_id, msg_id, created_ms) "
            "SELECT device_id, ?, created_ms FROM t"
            if column == "msg_id"
            else "INSERT INTO deletion_stand_ins (device_id, msg_id, created_ms) "
            "SELECT device_id, msg_id, ? FROM t",
            (value,),
        )
    rig.open()
    sent = rig.deliver_all()
    assert [o.kind for o in sent] == ["deletion-request"]  # a fresh stand-in went instead
    assert "a deletion stand-in makes no valid request; it is replaced" in caplog.text
