"""Cloud commands without a network: schemas, replay and staleness, and what apply does."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import commands
from agent.core.purposes import Purpose, rfc3339
from agent.errors import CommandRejected
from agent.runtime.commands import apply
from tests.core.helpers import Rig

NOW = 1_800_000_000.0


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


def test_replay_stale_and_future_commands_are_refused() -> None:
    guard = commands.ReplayGuard()
    guard.admit(parse("consent", body()), now=NOW)
    for doc, reason in [
        (body(), "replay"),
        (body(command_id="c-2", issued_at=rfc3339(NOW - 8 * 86400)), "stale"),
        (body(command_id="c-3", issued_at=rfc3339(NOW + 3600)), "from-the-future"),
        (body(command_id="c-4", issued_at="tuesday"), "schema"),
    ]:
        with pytest.raises(CommandRejected) as err:
            guard.admit(parse("consent", doc), now=NOW)
        assert err.value.reason == reason
    guard.admit(parse("consent", body(command_id="c-5")), now=NOW)


def test_apply_checks_binding_and_policy_version(tmp_path: Path) -> None:
    core = Rig(tmp_path).open()
    with pytest.raises(CommandRejected, match="not-bound"):
        apply(core, parse("consent", body()), now=NOW)
    core.bind("b-1", now=NOW)
    with pytest.raises(CommandRejected, match="other-binding"):
        apply(core, parse("consent", body(binding_id="b-0")), now=NOW)
    with pytest.raises(CommandRejected, match="policy-version"):
        apply(core, parse("consent", body(policy_version="0")), now=NOW)
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
    result = apply(core, parse("consent", body()), now=NOW)
    assert result == {"diagnostics": True}
    assert core.decide(Purpose.DIAGNOSTICS).allowed
    # A withdrawal under an old policy version still withdraws (P2 needs no version).
    off = body(purposes={"diagnostics": False}, policy_version="0")
    assert apply(core, parse("consent", off), now=NOW) == {"diagnostics": 0}
    assert not core.decide(Purpose.DIAGNOSTICS).allowed
    apply(core, parse("suspend-collection", body_min()), now=NOW)
    assert core.settings.consent.suspended
    request = apply(core, parse("unbind", body_owner()), now=NOW)
    assert request["deletion_request"]
    assert core.settings.binding_id is None


def body_min() -> dict[str, object]:
    return {"command_id": "s-1", "issued_at": rfc3339(NOW)}


def body_owner() -> dict[str, object]:
    return {**body_min(), "command_id": "u-1", "binding_id": "b-1"}
