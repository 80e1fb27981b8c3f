"""The device's rules driven directly: events in, plans out, no store and no clock."""

from __future__ import annotations

import dataclasses

import pytest

from agent.core import rules
from agent.core.items import DropReason
from agent.core.lifecycle import Event, State
from agent.core.location import Precision
from agent.core.ordering import Stamp
from agent.core.purposes import Purpose, parse_envelope
from agent.core.rules import CoreConfig, CrashReport, Settings
from agent.errors import ConsentNotInForce, SchemaError

CFG = CoreConfig(device_id="dev-1", serial="SN-1", model="m", firmware_version="1.0")
A, D = Purpose.ACTIVATION, Purpose.DIAGNOSTICS
T = 1_800_000_000.0


def bound(*grants: Purpose, minor: bool = False) -> Settings:
    s = Settings.fresh("1")
    s = rules.bind(s, CFG, "b-1", minor=minor, restored=False, now=T, msg_id="a0").settings
    for p in grants:
        s = rules.grant(s, CFG, p, now=T, source="local", msg_id="a1").settings
    return s


def test_bind_then_grant_captures_the_activation_once_with_a_coarse_location() -> None:
    s = rules.set_location(Settings.fresh("1"), 48.137154, 11.575382).settings
    s = rules.bind(s, CFG, "b-1", minor=False, restored=False, now=T, msg_id="x").settings
    assert s.lifecycle is State.ACTIVATION_DUE
    plan = rules.grant(s, CFG, A, now=T + 1, source="cloud", msg_id="act-1")
    assert plan.capture is not None
    assert plan.capture.msg_id == "act-1"
    assert parse_envelope(plan.capture.payload).data["location"] == {
        "lat": 48.1,
        "lon": 11.6,
        "precision": "region",
    }
    assert plan.settings.lifecycle is State.ACTIVATED
    assert [e["action"] for e in plan.ledger] == ["grant"]
    # A repeated grant is a new grant (SPEC §3), but the activation is not captured twice.
    again = rules.grant(plan.settings, CFG, A, now=T + 2, source="cloud", msg_id="act-2")
    assert again.capture is None
    assert [e["action"] for e in again.ledger] == ["grant"]
    receipt = again.settings.consent.grants[A].receipt()
    assert receipt.granted_at == "2027-01-15T08:00:02.000Z"


def test_withdraw_closes_the_gate_purges_and_ledgers_in_one_plan() -> None:
    plan = rules.withdraw(bound(D), CFG, D, now=T + 5, source="local")
    assert not rules.decide(plan.settings, D).allowed
    assert plan.purge == (rules.Purge(D, DropReason.WITHDRAWN),)
    assert [(e["action"], e["purpose"]) for e in plan.ledger] == [("withdraw", "diagnostics")]
    assert plan.save


def test_grant_needs_a_binding_and_a_crash_needs_consent() -> None:
    with pytest.raises(ConsentNotInForce):
        rules.grant(Settings.fresh("1"), CFG, D, now=T, source="local", msg_id="x")
    with pytest.raises(ConsentNotInForce):
        rules.crash(bound(A), CFG, CrashReport("s", "x"), now=T, msg_id="c")
    with pytest.raises(ConsentNotInForce):
        rules.crash(bound(D, minor=True), CFG, CrashReport("s", "x"), now=T, msg_id="c")


def test_suspension_stops_everything_and_resume_releases() -> None:
    s = bound(D)
    stamp = Stamp.cloud(T)
    plan = rules.suspension(s, CFG, True, now=T, source="cloud", msg_id="x", stamp=stamp)
    assert plan.stop == frozenset(Purpose)
    assert rules.may_send(plan.settings, D, T, T) == "hold"
    resumed = rules.suspension(
        plan.settings, CFG, False, now=T, source="cloud", msg_id="x", stamp=stamp
    )
    assert resumed.stop == frozenset()
    assert rules.may_send(resumed.settings, D, T, T) == "send"


def test_expired_items_are_never_sent() -> None:
    s = bound(D)
    assert rules.may_send(s, D, T, T + 14 * 86_400) == "send"
    assert rules.may_send(s, D, T, T + 14 * 86_400 + 1) == "expired"


@pytest.mark.parametrize("event", [Event.UNBIND, Event.FACTORY_RESET, Event.ACCOUNT_CANCELLED])
def test_wipe_plans_a_journaled_wipe_with_one_deletion_request(event: Event) -> None:
    s = rules.set_precision(bound(A, D), Precision.CITY, now=T).settings
    plan = rules.wipe(s, CFG, event, now=T, msg_id="dr-1")
    assert plan.wipe is not None
    assert plan.wipe.journal
    assert plan.wipe.deletion_request is not None
    msg_id, _at, payload = plan.wipe.deletion_request
    assert msg_id == "dr-1"
    assert parse_envelope(payload).data["binding_id"] == "b-1"
    assert plan.settings.lifecycle is State.FACTORY_NEW
    assert plan.settings.precision is Precision.REGION  # a wipe resets precision (P3)
    assert not any(rules.decide(plan.settings, p).allowed for p in Purpose)


def test_factory_reset_of_a_new_device_sends_no_deletion_request() -> None:
    plan = rules.wipe(Settings.fresh("1"), CFG, Event.FACTORY_RESET, now=T, msg_id="x")
    assert plan.wipe is not None
    assert not plan.wipe.journal
    assert plan.wipe.deletion_request is None


def test_a_new_policy_supersedes_earlier_grants() -> None:
    cfg = CoreConfig(
        device_id="dev-1", serial="S", model="m", firmware_version="1.0", policy_version="2"
    )
    plan = rules.policy_changed(bound(A, D), cfg, now=T, msg_id="x")
    assert {p.purpose for p in plan.purge} == {A, D}
    assert not any(rules.decide(plan.settings, p).allowed for p in Purpose)


@pytest.mark.parametrize("binding_id", ["owner-\udcff", "", "with space", "tab\there", "x" * 129])
def test_a_binding_id_must_be_visible_ascii(binding_id: str) -> None:
    with pytest.raises(SchemaError, match="binding ID must be 1 to 128 visible ASCII"):
        rules.bind(
            Settings.fresh("1"), CFG, binding_id, minor=False, restored=False, now=T, msg_id="x"
        )


def test_nothing_stored_can_block_a_wipe_or_its_deletion_request() -> None:
    s = dataclasses.replace(bound(A), binding_id="owner-\udcff")  # as an older version stored it
    plan = rules.wipe(s, CFG, Event.UNBIND, now=T, msg_id="dr-1")
    assert plan.wipe is not None
    assert plan.wipe.deletion_request is not None
    data = parse_envelope(plan.wipe.deletion_request[2]).data
    assert data["binding_id"].startswith("sha256:")
    assert plan.settings.lifecycle is State.FACTORY_NEW
