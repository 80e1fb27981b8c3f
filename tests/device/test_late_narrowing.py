"""A narrowing choice covers the data that existed when it was made (SPEC §3).

The cloud narrows while the device is offline; before the device hears it, the user
widens the same setting again (on the device, or the cloud's own later command arrives
first). The setting keeps the later value, but nothing captured before that later
change may leave: withdrawn items are deleted, locations coarsened or removed,
suspended-period items deleted. Each case is run directly and across a reboot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from agent.core import commands
from agent.core.location import Precision
from agent.core.ordering import Clock
from agent.core.purposes import Purpose, parse_envelope, rfc3339
from agent.device import CrashReport, Device
from tests.device.helpers import Recorder, Rig

NOW = 1_800_000_000.0
A, D = Purpose.ACTIVATION, Purpose.DIAGNOSTICS
CRASH = CrashReport(signature="SIGSEGV", stack="Traceback:\n  File 'm.py', line 1, in f\n")


LATE = "applied to earlier data: older than the latest change"


def send(rig: Rig, name: str, doc: Mapping[str, object], *, now: float) -> dict[str, object]:
    """The cloud's command ``name``, issued at ``doc['issued_at']``, heard at ``now``."""
    assert rig.core is not None
    base: dict[str, object] = {"command_id": f"{name}-{doc['issued_at']}"}
    if name not in ("suspend-collection", "resume-collection"):
        base["binding_id"] = "b-1"
    command = commands.parse(name, json.dumps({**base, **doc}).encode())
    return rig.core.take(command, now=now).result


def at(t: float) -> str:
    return rfc3339(NOW + t)


def consent_doc(t: float, granted: bool) -> dict[str, object]:
    """A consent command for diagnostics issued at ``t``."""
    return {"issued_at": at(t), "purposes": {"diagnostics": granted}, "policy_version": "1"}


def start(tmp_path: Path, *purposes: Purpose) -> tuple[Rig, Device]:
    """Bound, clock compared with the cloud's (0.3 s error), ``purposes`` granted at t=0."""
    rig = Rig(tmp_path)
    rig.now = NOW
    core = rig.open()
    core.clock_compared(Clock(offset=0.0, error=0.3, measured_at=NOW), now=NOW)
    core.set_location(48.137154, 11.575382, now=NOW)
    core.set_precision(Precision.CITY, now=NOW)
    core.bind("b-1", now=NOW)
    for p in purposes:
        core.grant(p, now=NOW)
    return rig, core


def sent_ids(rig: Rig) -> set[str]:
    return {o.msg_id for o in rig.deliver_all()}


@pytest.mark.parametrize("reboot", [False, True])
def test_a_withdrawal_heard_after_a_local_re_grant_deletes_what_it_covered(
    tmp_path: Path, reboot: bool
) -> None:
    rig, core = start(tmp_path, D)
    before = core.capture_crash(CRASH, now=NOW + 5)  # captured before the withdrawal (t=10)
    between = core.capture_crash(CRASH, now=NOW + 15)  # withdrawn in the user's order
    core.grant(D, now=NOW + 20)  # the user grants again on the device, still offline
    after = core.capture_crash(CRASH, now=NOW + 25)
    if reboot:
        core = rig.open()
    result = send(rig, "consent", consent_doc(10, granted=False), now=NOW + 30)
    assert result == {"consent:diagnostics": LATE}
    assert core.decide(D).allowed  # the later grant stays in force
    rig.now = NOW + 31
    sent = sent_ids(rig)
    assert before not in sent
    assert between not in sent
    assert sent == {after}


def test_a_withdrawal_heard_after_the_clouds_own_later_grant_deletes_what_it_covered(
    tmp_path: Path,
) -> None:
    rig, core = start(tmp_path, D)
    early = core.capture_crash(CRASH, now=NOW + 5)
    # Both issued while the device was offline; the grant happens to arrive first.
    grant = consent_doc(20, granted=True)
    assert send(rig, "consent", grant, now=NOW + 30) == {"consent:diagnostics": "applied"}
    late = core.capture_crash(CRASH, now=NOW + 31)
    assert send(rig, "consent", consent_doc(10, granted=False), now=NOW + 32) == {
        "consent:diagnostics": LATE
    }
    rig.now = NOW + 33
    assert sent_ids(rig) == {late}
    assert early is not None


@pytest.mark.parametrize("reboot", [False, True])
@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (Precision.OFF, None),
        (Precision.COUNTRY, {"lat": 48.0, "lon": 12.0, "precision": "country"}),
    ],
)
def test_a_coarser_precision_heard_after_a_local_finer_one_reaches_earlier_activations(
    tmp_path: Path, level: Precision, expected: dict[str, object] | None, reboot: bool
) -> None:
    rig, core = start(tmp_path)
    core.grant(A, now=NOW + 5)  # the activation is captured now, with a city location
    assert core.queued_count() == 1
    core.set_precision(Precision.CITY, now=NOW + 20)  # the user, after the cloud's choice
    if reboot:
        core = rig.open()
    doc = {"issued_at": at(10), "precision": level.value}
    assert send(rig, "location-precision", doc, now=NOW + 30) == {"precision": LATE}
    assert core.settings.precision is Precision.CITY  # the later choice stays in force
    stored = core.settings.location  # taken before the choice: coarsened too
    assert (stored.precision if stored else Precision.OFF) is level
    rig.now = NOW + 31
    (item,) = rig.deliver_all()
    assert parse_envelope(item.payload).data["location"] == expected


@pytest.mark.parametrize("reboot", [False, True])
def test_a_suspension_heard_after_its_resume_deletes_what_it_covered(
    tmp_path: Path, reboot: bool
) -> None:
    rig, core = start(tmp_path, D)
    before = core.capture_crash(CRASH, now=NOW + 5)  # queued when the service stopped
    during = core.capture_crash(CRASH, now=NOW + 15)  # captured while suspended
    resume = {"issued_at": at(20)}
    assert send(rig, "resume-collection", resume, now=NOW + 30) == {"suspension": "applied"}
    after = core.capture_crash(CRASH, now=NOW + 31)
    if reboot:
        core = rig.open()
    result = send(rig, "suspend-collection", {"issued_at": at(10)}, now=NOW + 32)
    assert result == {"suspension": LATE}
    assert not core.settings.control.suspended
    rig.now = NOW + 33
    sent = sent_ids(rig)
    assert before not in sent
    assert during not in sent
    assert sent == {after}


@pytest.mark.parametrize(
    "late",
    [
        lambda rig: send(rig, "consent", consent_doc(10, granted=False), now=NOW + 30),
        lambda rig: send(rig, "suspend-collection", {"issued_at": at(10)}, now=NOW + 30),
    ],
    ids=["withdraw", "suspend"],
)
def test_a_late_narrowing_stops_what_the_transport_holds(
    tmp_path: Path, late: Callable[[Rig], object]
) -> None:
    rig, core = start(tmp_path, D)
    core.capture_crash(CRASH, now=NOW + 5)
    core.grant(D, now=NOW + 20)
    rig.now = NOW + 29
    flying = core.next_batch(now=rig.now)
    assert len(flying) == 1
    seen = Recorder()
    core.watch(seen)
    late(rig)
    assert seen.stops
    assert D in seen.stops[0]  # unwritten bytes of it are not written (P2)
    assert core.in_flight() == []  # it was handed over before: its PUBACK is ledgered
