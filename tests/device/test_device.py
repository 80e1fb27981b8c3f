"""The device core over a real encrypted store: promises P1-P13 as the core keeps them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from agent.core.items import DropReason
from agent.core.lifecycle import State
from agent.core.location import Precision
from agent.core.purposes import CrashData, Purpose, parse_envelope
from agent.device import CrashReport
from agent.errors import ConsentNotInForce, IllegalTransition
from agent.runtime.daemon import retention
from tests.device.helpers import Recorder, Rig

A, D = Purpose.ACTIVATION, Purpose.DIAGNOSTICS
CRASH = CrashReport(
    signature="SIGSEGV in fan_ctl",
    stack='File "/home/alice/x.py", line 0 contact alice@example.com token=abc123',
    ip_addresses=("192.0.2.7",),
    default_gateway="192.0.2.1",
    routes=({"destination": "0.0.0.0/0", "gateway": "192.0.2.1", "interface": "wlan0"},),
    uptime_s=12.5,
)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    r.open()
    return r


def bound(rig: Rig, *purposes: Purpose, minor: bool = False) -> None:
    assert rig.core is not None
    rig.core.bind("bind-1", now=rig.tick(), minor=minor)
    for p in purposes:
        rig.core.grant(p, now=rig.tick())


def test_nothing_without_consent(rig: Rig) -> None:
    core = rig.core
    assert core is not None
    with pytest.raises(ConsentNotInForce, match="not-bound"):
        core.capture_crash(CRASH, now=rig.tick())
    bound(rig)
    with pytest.raises(ConsentNotInForce, match="not-granted") as info:
        core.capture_crash(CRASH, now=rig.tick())
    assert info.value.purpose == "diagnostics"
    assert core.queued_count() == 0
    assert rig.deliver_all() == []
    assert core.lifecycle is State.ACTIVATION_DUE  # activation still due, waiting for consent


def test_activation_once_after_consent_with_coarse_location(rig: Rig) -> None:
    core = rig.core
    assert core is not None
    core.set_precision(Precision.CITY, now=rig.tick())
    core.set_location(48.856613, 2.352222, now=rig.tick())
    bound(rig, A)
    sent = rig.deliver_all()
    assert [o.kind for o in sent] == ["activation"]
    env = parse_envelope(sent[0].payload)
    assert env.data["location"] == {"lat": 48.86, "lon": 2.35, "precision": "city"}
    assert env.data["trigger"] == "first-activation"
    assert env.consent is not None
    assert env.consent.policy_version == "1"
    assert b"48.856613" not in rig.root.joinpath("state.db").read_bytes()
    # Granting again, or setting a location, never sends another activation (P4).
    core.grant(A, now=rig.tick())
    core.set_location(1.0, 1.0, now=rig.tick())
    assert rig.deliver_all() == []
    assert core.lifecycle is State.ACTIVATED


def test_firmware_update_and_restore_trigger_activation(rig: Rig) -> None:
    bound(rig, A)
    assert len(rig.deliver_all()) == 1
    rig.firmware = "1.1.0"
    core = rig.open()  # reboot into new firmware
    sent = rig.deliver_all()
    assert [parse_envelope(o.payload).data["trigger"] for o in sent] == ["firmware-update"]
    core.factory_reset(now=rig.tick())
    rig.deliver_all()  # the deletion request
    bound(rig, A)
    sent = rig.deliver_all()
    assert [parse_envelope(o.payload).data["trigger"] for o in sent] == ["restore"]


def test_crash_is_scrubbed_and_gated(rig: Rig) -> None:
    bound(rig, D)
    assert rig.core is not None
    rig.core.capture_crash(CRASH, now=rig.tick())
    (item,) = rig.deliver_all()
    data = json.loads(item.payload)["data"]
    assert "alice" not in item.payload.decode()
    assert "abc123" not in item.payload.decode()
    assert data["ip_addresses"] == ["192.0.2.7"]
    assert data["exception"] == "SIGSEGV"
    assert data["frames"] == [{"module": "<external>", "function": "<unknown>", "line": 0}]
    assert set(data) == set(CrashData.model_fields)


def test_withdraw_purges_pending_and_in_flight(rig: Rig) -> None:
    bound(rig, D)
    core = rig.core
    assert core is not None
    seen = Recorder()
    core.watch(seen)
    ids = [core.capture_crash(CRASH, now=rig.tick()) for _ in range(5)]
    flying = core.next_batch(now=rig.now, limit=2)
    removed = core.withdraw(D, now=rig.tick())
    assert removed == 5
    assert core.in_flight() == []
    assert core.queued_count() == 0
    # The two in flight went at once; the three queued with their key, their rows with
    # the reaper, and the observers heard of each.
    assert sorted(seen.dropped_ids) == sorted(f.msg_id for f in flying)
    core.reap_all()
    assert sorted(seen.dropped_ids) == sorted(ids)
    assert set(seen.reasons) == {DropReason.WITHDRAWN}
    assert core.next_batch(now=rig.now) == []
    # A PUBACK that races the withdrawal: it left the device, so it is ledgered, once.
    assert not core.acknowledged(flying[0].msg_id, now=rig.tick())
    assert not core.acknowledged(flying[0].msg_id, now=rig.tick())
    sent = [e for e in core.export(now=rig.now)["entries"] if e["type"] == "sent"]
    assert [e["msg_id"] for e in sent] == [flying[0].msg_id]
    assert rig.open().queued_count() == 0


def test_retention_drops_old_items_unsent(rig: Rig) -> None:
    bound(rig, D)
    assert rig.core is not None
    rig.core.capture_crash(CRASH, now=rig.tick())
    rig.tick(15 * 86_400)
    assert rig.core.next_batch(now=rig.now) == []
    assert rig.core.dropped[DropReason.EXPIRED] == 1


def test_cap_drops_oldest(tmp_path: Path) -> None:
    rig = Rig(tmp_path, cap=3)
    rig.open()
    bound(rig, D)
    assert rig.core is not None
    ids = [rig.core.capture_crash(CRASH, now=rig.tick()) for _ in range(5)]
    assert rig.core.queued_count() == 3
    assert [o.msg_id for o in rig.deliver_all()] == ids[2:]
    assert rig.core.dropped[DropReason.CAPACITY] == 2


def test_minor_blocks_everything(rig: Rig) -> None:
    bound(rig, A, D, minor=True)
    assert rig.core is not None
    with pytest.raises(ConsentNotInForce, match="minor"):
        rig.core.capture_crash(CRASH, now=rig.tick())
    assert rig.deliver_all() == []


def test_suspend_covers_what_was_queued_and_resume_sends_only_new(rig: Rig) -> None:
    """SPEC §3: a suspension covers the data that exists when it is made (P13)."""
    bound(rig, D)
    core = rig.core
    assert core is not None
    core.capture_crash(CRASH, now=rig.tick())
    core.set_suspended(True, now=rig.tick())
    assert core.queued_count() == 0
    with pytest.raises(ConsentNotInForce, match="suspended"):
        core.capture_crash(CRASH, now=rig.tick())
    assert rig.deliver_all() == []
    core = rig.open()
    assert core.status()["suspended"] is True  # survives a reboot
    core.set_suspended(False, now=rig.tick())
    assert rig.deliver_all() == []  # what existed when it was suspended never leaves
    msg = core.capture_crash(CRASH, now=rig.tick())
    assert [o.msg_id for o in rig.deliver_all()] == [msg]


def test_policy_change_voids_grants_and_pending(rig: Rig) -> None:
    bound(rig, D)
    assert rig.core is not None
    rig.core.capture_crash(CRASH, now=rig.tick())
    rig.policy_version = "2"
    core = rig.open()
    assert core.decide(D).reason.value == "stale-policy"
    assert core.queued_count() == 0
    core.grant(D, now=rig.tick())
    core.capture_crash(CRASH, now=rig.tick())
    (item,) = rig.deliver_all()
    env = parse_envelope(item.payload)
    assert env.consent is not None
    assert env.consent.policy_version == "2"


@pytest.mark.parametrize("how", ["unbind", "factory_reset", "account_cancelled"])
def test_wipe_shreds_and_leaves_one_deletion_request(rig: Rig, how: str) -> None:
    bound(rig, A, D)
    core = rig.core
    assert core is not None
    crash_dir = rig.root / "crash"
    crash_dir.mkdir()
    (crash_dir / "core.1").write_text("dump")
    core.capture_crash(CRASH, now=rig.tick())
    core.capture_crash(CRASH, now=rig.tick())
    flying = core.next_batch(now=rig.now, limit=1)
    seen = Recorder()
    core.watch(seen)
    key = rig.root / "keys" / "dev-1.data.key"
    assert key.exists()
    dr = getattr(core, how)(now=rig.tick())
    assert dr is not None
    # The transport is told of every personal item once: in flight and queued alike.
    told = seen.dropped_ids
    assert len(told) == len(set(told)) == core.dropped[DropReason.WIPED]
    assert flying[0].msg_id in told
    assert not key.exists()
    assert not any(crash_dir.iterdir())
    assert (rig.root / "keys" / "dev-1.system.key").exists()  # survives: sends the request
    core = rig.open()  # reboot while offline
    assert core.lifecycle is State.FACTORY_NEW
    assert core.queued_count() == 0
    assert core.export(now=rig.now)["entries"] == []
    sent = rig.deliver_all()
    assert [o.kind for o in sent] == ["deletion-request"]
    data = parse_envelope(sent[0].payload).data
    assert data["binding_id"] == "bind-1"
    assert data["reason"] == how.replace("_", "-")
    assert rig.open().next_batch(now=rig.now) == []  # acknowledged: gone for good


def test_unbind_when_not_bound_is_illegal(rig: Rig) -> None:
    assert rig.core is not None
    with pytest.raises(IllegalTransition):
        rig.core.unbind(now=rig.tick())
    assert rig.core.factory_reset(now=rig.tick()) is None  # nothing to delete in the cloud


def test_interrupted_wipe_is_finished_on_open(rig: Rig) -> None:
    bound(rig, D)
    core = rig.core
    assert core is not None
    core.capture_crash(CRASH, now=rig.tick())
    # Simulate a crash right after step 1 of the wipe.
    core.store.begin_wipe("unbind", None)
    core = rig.open()
    assert core.lifecycle is State.FACTORY_NEW
    assert core.queued_count() == 0
    assert not (rig.root / "keys" / "dev-1.data.key").exists()


def test_acknowledged_never_resent_after_reboot(rig: Rig) -> None:
    bound(rig, D)
    core = rig.core
    assert core is not None
    a = core.capture_crash(CRASH, now=rig.tick())
    b = core.capture_crash(CRASH, now=rig.tick())
    batch = core.next_batch(now=rig.now)
    core.acknowledged(a, now=rig.tick())  # b in flight, unacknowledged, when we reboot
    assert {o.msg_id for o in batch} == {a, b}
    assert [o.msg_id for o in rig.open().next_batch(now=rig.now)] == [b]


def test_export_ledger(rig: Rig) -> None:
    bound(rig, D)
    assert rig.core is not None
    rig.core.capture_crash(CRASH, now=rig.tick())
    (sent,) = rig.deliver_all()
    rig.core.withdraw(D, now=rig.tick())
    doc = rig.core.export(now=rig.now)
    kinds = [(e["type"], e.get("action")) for e in doc["entries"]]
    assert kinds == [("consent", "grant"), ("sent", None), ("consent", "withdraw")]
    entry = doc["entries"][1]
    assert entry["msg_id"] == sent.msg_id
    assert "frames" in entry["fields"]
    assert len(entry["sha256"]) == 64
    assert "alice" not in json.dumps(doc)


def test_deletion_requests_beyond_the_batch_limit_wait_their_turn(rig: Rig) -> None:
    core = rig.open()
    requests = []
    for n in range(3):  # three owners come and go while the device is offline
        core.bind(f"b-{n}", now=rig.tick())
        requests.append(core.unbind(now=rig.tick()))
    first = core.next_batch(now=rig.tick(), limit=2)
    assert [o.msg_id for o in first] == requests[:2]
    assert core.in_flight() == requests[:2]  # the third is not marked in flight
    for out in first:
        core.acknowledged(out.msg_id, now=rig.now)
    assert [o.msg_id for o in core.next_batch(now=rig.tick(), limit=2)] == requests[2:]


def test_suspension_keeps_what_is_on_the_wire_and_deletes_the_rest(rig: Rig) -> None:
    bound(rig, D)
    core = rig.core
    assert core is not None
    ids = [core.capture_crash(CRASH, now=rig.tick()) for _ in range(3)]
    flying = core.next_batch(now=rig.now, limit=2)
    seen = Recorder()
    core.watch(seen)
    core.set_suspended(True, now=rig.tick())
    assert seen.stops == [frozenset(Purpose)]  # the transport stops what it has not written
    for out in flying:  # written before the suspension: their PUBACKs still come
        core.acknowledged(out.msg_id, now=rig.tick())
    sent = {e["msg_id"] for e in core.export(now=rig.now)["entries"] if e["type"] == "sent"}
    assert sent == set(ids[:2])  # in the user's record (P11), not lost from it
    assert core.next_batch(now=rig.tick()) == []  # deleted by the suspension (P13)
    core.connection_lost(now=rig.now)
    assert core.next_batch(now=rig.tick()) == []
    core.set_suspended(False, now=rig.tick())
    assert core.next_batch(now=rig.now) == []  # the suspension covered the queued one (§3)


def test_a_suspension_applies_unbound_and_lasts_across_unbind_rebind_and_restart(
    rig: Rig,
) -> None:
    core = rig.core
    assert core is not None
    core.set_suspended(True, now=rig.tick())  # nobody bound yet (P13)
    bound(rig, A, D)
    assert not core.decide(D).allowed
    core.unbind(now=rig.tick())
    core = rig.open()  # a restart
    bound(rig, A, D)
    assert rig.core is not None
    assert rig.core.status()["suspended"]
    assert rig.core.decide(D).reason.value == "suspended"
    rig.core.set_suspended(False, now=rig.tick())
    assert rig.core.decide(D).allowed


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (Precision.COUNTRY, {"lat": 48.0, "lon": 12.0, "precision": "country"}),
        (Precision.OFF, None),
        (Precision.CITY, {"lat": 48.14, "lon": 11.58, "precision": "city"}),  # finer: unchanged
    ],
)
def test_a_coarser_precision_reaches_queued_activations(
    rig: Rig, level: Precision, expected: dict[str, object] | None
) -> None:
    core = rig.core
    assert core is not None
    core.set_precision(Precision.CITY, now=rig.tick())
    core.set_location(48.137154, 11.575382, now=rig.tick())
    bound(rig, A)  # the activation is queued with a city-level location
    seen = Recorder()
    core.watch(seen)
    core.set_precision(level, now=rig.tick())
    (item,) = rig.deliver_all()
    assert parse_envelope(item.payload).data["location"] == expected
    assert seen.stops == ([] if level is Precision.CITY else [frozenset({A})])


def test_retention_is_swept_without_a_connection(rig: Rig) -> None:
    bound(rig, D)
    core = rig.core
    assert core is not None
    core.capture_crash(CRASH, now=rig.tick())
    assert core.sweep_retention(now=rig.now + 13 * 86_400) == 0
    assert core.sweep_retention(now=rig.now + 15 * 86_400) == 1  # P7, no hand-off needed
    assert core.queued_count() == 0
    assert core.dropped[DropReason.EXPIRED] == 1


@pytest.mark.asyncio
async def test_the_daemon_sweeps_retention_on_a_timer(tmp_path: Path) -> None:
    rig = Rig(tmp_path, now=time.time() - 15 * 86_400)  # captured 15 days ago
    core = rig.open()
    bound(rig, D)
    core.capture_crash(CRASH, now=rig.tick())
    sweeper = asyncio.create_task(retention(core, interval=0.01))
    try:
        async with asyncio.timeout(5):
            while core.queued_count():  # noqa: ASYNC110  # the timer's effect, no event to await
                await asyncio.sleep(0.01)
    finally:
        sweeper.cancel()
    assert core.dropped[DropReason.EXPIRED] == 1


def test_an_item_recalled_on_the_wire_is_ledgered_unconfirmed_when_the_link_goes(
    rig: Rig,
) -> None:
    """P11: it left the device before the withdrawal, and no PUBACK can come for it
    now; the ledger says it was sent, unconfirmed, once."""
    bound(rig, D)
    core = rig.core
    assert core is not None
    msg_id = core.capture_crash(CRASH, now=rig.tick())
    assert [o.msg_id for o in core.next_batch(now=rig.now, limit=1)] == [msg_id]
    core.withdraw(D, now=rig.tick())
    core.connection_lost(now=rig.tick())
    assert not core.acknowledged(msg_id, now=rig.tick())  # too late: changes nothing
    sent = [e for e in core.export(now=rig.now)["entries"] if e["type"] == "sent"]
    assert [(e["msg_id"], e["confirmed"]) for e in sent] == [(msg_id, False)]
    assert core.in_flight() == []
    assert core.next_batch(now=rig.now) == []
