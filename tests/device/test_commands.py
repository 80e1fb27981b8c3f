"""Cloud commands without a network: schemas, replay and staleness, and what apply does."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import commands
from agent.core.ordering import Clock
from agent.core.purposes import Purpose, rfc3339
from agent.device import Device
from agent.errors import CommandRejected
from tests.device.helpers import Rig

NOW = 1_800_000_000.0
UNKNOWN_ORDER = "ignored: not certainly newer than the latest change (the order is unknown)"


def body(**kw: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "command_id": "c-1",
        "issued_at": rfc3339(NOW),
        "binding_id": "b-1",
        "purposes": {"diagnostics": True},
        "policy_version": "1",
    }
    doc.update(kw)
    return doc


def parse(name: str, doc: dict[str, object]) -> commands.Command:
    return commands.parse(name, json.dumps(doc).encode())


@given(st.text(max_size=30), st.binary(max_size=600))
@settings(max_examples=300)
def test_parse_raises_only_command_rejected(name: str, payload: bytes) -> None:
    # Any other exception escaping here fails the test: hostile input never crashes.
    with contextlib.suppress(CommandRejected):
        commands.parse(name, payload)


@pytest.mark.parametrize(
    ("name", "doc", "reason"),
    [
        ("reboot", body(), "unknown-command"),
        ("consent", body(extra=1), "schema"),
        ("consent", body(purposes={"location": True}), "schema"),
        ("consent", body(purposes={}), "schema"),
        ("consent", body(purposes={"diagnostics": 1}), "schema"),
        ("location-precision", body(precision="street"), "schema"),
        ("suspend-collection", {"command_id": "x"}, "schema"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(
    name: str, doc: dict[str, object], reason: str
) -> None:
    with pytest.raises(CommandRejected) as err:
        parse(name, doc)
    assert err.value.reason == reason


def test_size_limit() -> None:
    with pytest.raises(CommandRejected, match="too-large"):
        commands.parse("consent", b" " * (commands.MAX_BYTES + 1))


def take(rig: Rig, name: str, doc: dict[str, object], now: float = NOW) -> dict[str, object]:
    assert rig.core is not None
    return rig.core.take(parse(name, doc), now=now).result


def test_widening_commands_must_be_fresh_and_never_replayed(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.open().bind("b-1", now=NOW)
    assert take(rig, "consent", body()) == {"consent:diagnostics": "applied"}
    for doc, reason in [
        (body(), "replay"),
        (body(command_id="c-2", issued_at=rfc3339(NOW - 8 * 86400)), "stale"),
        (body(command_id="c-3", issued_at=rfc3339(NOW + 3600)), "from-the-future"),
    ]:
        with pytest.raises(CommandRejected) as err:
            take(rig, "consent", doc)
        assert err.value.reason == reason
    assert take(rig, "consent", body(command_id="c-5", issued_at=rfc3339(NOW + 1))) == {
        "consent:diagnostics": "applied"
    }


@pytest.mark.parametrize(
    "issued_at",
    [
        "20261122T103000Z",  # ISO 8601 basic format
        "2026-W47-7T10:30:00Z",  # week date
        "2026-11-22T10:30:00Z\x00",  # a trailing NUL
        "2026-11-22 10:30:00Z",  # a space for "T"
        "2026-11-22T10:30:00",  # no offset
        "2026-11-22T10:30:00+01:00",  # not UTC
        "2026-11-22T10:30:00\u0660Z",  # a digit from another script
        "tuesday",
    ],
)
def test_issued_at_must_be_strict_rfc3339_utc(issued_at: str) -> None:
    with pytest.raises(CommandRejected, match="schema"):
        parse("consent", body(issued_at=issued_at))


def test_a_replay_is_refused_after_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.open().bind("b-1", now=NOW)
    take(rig, "consent", body())
    take(rig, "consent", body(command_id="w-1", purposes={"diagnostics": False}))
    core = rig.open()  # the daemon restarts: the memory is in the store
    with pytest.raises(CommandRejected, match="replay"):
        take(rig, "consent", body())
    assert not core.decide(Purpose.DIAGNOSTICS).allowed


def test_a_replay_is_refused_after_thousands_of_other_commands(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    core = rig.open()
    core.bind("b-1", now=NOW)
    take(rig, "consent", body(command_id="first"))
    take(rig, "consent", body(command_id="off", purposes={"diagnostics": False}))
    with core.store.db.transaction():
        for n in range(5000):
            take(rig, "suspend-collection", {**body_min(), "command_id": f"s-{n}"})
    with pytest.raises(CommandRejected, match="replay"):
        take(rig, "consent", body(command_id="first"))


def test_a_cloud_grant_issued_before_a_later_local_withdrawal_is_ignored(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    core = rig.open()
    core.bind("b-1", now=NOW)
    compared(core, NOW)
    core.withdraw(Purpose.DIAGNOSTICS, now=NOW + 60)  # the user, on the device
    # The cloud had issued a grant a minute earlier; it arrives only now.
    result = take(rig, "consent", body(issued_at=rfc3339(NOW + 1)), now=NOW + 120)
    assert result == {"consent:diagnostics": "ignored: older than the latest change"}
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
    # A grant issued after the withdrawal applies.
    result = take(
        rig, "consent", body(command_id="c-9", issued_at=rfc3339(NOW + 90)), now=NOW + 120
    )
    assert result == {"consent:diagnostics": "applied"}
    assert core.decide(Purpose.DIAGNOSTICS).allowed


def test_without_a_clock_comparison_the_narrowing_choice_wins(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    core = rig.open()
    core.bind("b-1", now=NOW)
    core.withdraw(Purpose.DIAGNOSTICS, now=NOW)  # device time, never compared with the cloud's
    result = take(rig, "consent", body(issued_at=rfc3339(NOW + 3600)), now=NOW + 3600)
    assert result == {"consent:diagnostics": UNKNOWN_ORDER}
    assert not core.decide(Purpose.DIAGNOSTICS).allowed


@pytest.mark.parametrize("skew_s", [-600.0, 8 * 86400.0])
def test_narrowing_commands_apply_whatever_the_clock_skew(tmp_path: Path, skew_s: float) -> None:
    rig = Rig(tmp_path)
    core = rig.open()
    core.bind("b-1", now=NOW + skew_s)
    core.grant(Purpose.DIAGNOSTICS, now=NOW + skew_s)  # local, at the skewed device time
    device_now = NOW + 60 + skew_s
    off = body(command_id="w-1", purposes={"diagnostics": False}, issued_at=rfc3339(NOW + 60))
    assert take(rig, "consent", off, now=device_now) == {"consent:diagnostics": "applied"}
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
    take(rig, "suspend-collection", body_min() | {"issued_at": rfc3339(NOW + 61)}, device_now)
    assert core.settings.control.suspended


def test_take_checks_binding_and_policy_version(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    core = rig.open()
    with pytest.raises(CommandRejected, match="not-bound"):
        take(rig, "consent", body())
    core.bind("b-1", now=NOW)
    with pytest.raises(CommandRejected, match="other-binding"):
        take(rig, "consent", body(binding_id="b-0"))
    with pytest.raises(CommandRejected, match="policy-version"):
        take(rig, "consent", body(policy_version="0"))
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
    assert take(rig, "consent", body()) == {"consent:diagnostics": "applied"}
    assert core.decide(Purpose.DIAGNOSTICS).allowed
    # A withdrawal under an old policy version still withdraws (P2 needs no version).
    off = body(command_id="w-1", purposes={"diagnostics": False}, policy_version="0")
    assert take(rig, "consent", off) == {"consent:diagnostics": "applied"}
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
    take(rig, "suspend-collection", body_min())
    assert core.settings.control.suspended
    assert take(rig, "unbind", body_owner()) == {"binding": "applied"}
    assert core.settings.binding_id is None


def compared(core: Device, now: float) -> None:
    """The command sync measured the device clock: it agrees with the cloud's."""
    core.clock_compared(Clock(offset=0.0, error=0.5, measured_at=now), now=now)


def body_min() -> dict[str, object]:
    return {"command_id": "s-1", "issued_at": rfc3339(NOW)}


def body_owner() -> dict[str, object]:
    return {**body_min(), "command_id": "u-1", "binding_id": "b-1"}


def test_a_narrowing_command_of_unknown_order_does_not_let_an_older_grant_pass(
    tmp_path: Path,
) -> None:
    """Offline: the owner withdraws on the device; the cloud's earlier withdrawal and a
    grant issued between them arrive afterwards, before any clock comparison."""
    rig = Rig(tmp_path)
    core = rig.open()
    core.bind("b-1", now=NOW)
    core.grant(Purpose.DIAGNOSTICS, now=NOW)
    core.withdraw(Purpose.DIAGNOSTICS, now=NOW + 60)  # device time, never compared
    off = body(command_id="w-1", purposes={"diagnostics": False}, issued_at=rfc3339(NOW + 20))
    assert take(rig, "consent", off, now=NOW + 100) == {"consent:diagnostics": "applied"}
    grant = body(command_id="g-1", issued_at=rfc3339(NOW + 40))
    result = take(rig, "consent", grant, now=NOW + 100)
    assert result == {"consent:diagnostics": UNKNOWN_ORDER}
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
