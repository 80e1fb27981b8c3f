"""Table-driven tests of the pure core: consent gate, lifecycle and outbox tables,
location coarsening, scrubbing and schemas."""

from __future__ import annotations

import json

import pytest

from agent.core import consent, items, lifecycle
from agent.core.consent import ConsentState, Reason
from agent.core.lifecycle import Event, State
from agent.core.location import Precision, coarsen, finer_than, parse_precision, recoarsen
from agent.core.purposes import (
    ConsentReceipt,
    Purpose,
    build_envelope,
    parse_envelope,
    validate_data,
)
from agent.core.scrub import scrub
from agent.errors import IllegalTransition, SchemaError

A, D = Purpose.ACTIVATION, Purpose.DIAGNOSTICS


def _bound(**kw: object) -> ConsentState:
    s = consent.bound(ConsentState(policy_version="2"), minor=bool(kw.pop("minor", False)))
    return consent.grant(s, A, now=10.0, source="local") if kw.pop("grant", True) else s


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (ConsentState(policy_version="2"), Reason.NOT_BOUND),
        (_bound(grant=False), Reason.NOT_GRANTED),
        (_bound(), Reason.OK),
        (_bound(minor=True), Reason.MINOR),
        (consent.suspended(_bound(), True), Reason.SUSPENDED),
        (consent.suspended(consent.suspended(_bound(), True), False), Reason.OK),
        (consent.withdraw(_bound(), A), Reason.NOT_GRANTED),
        (consent.with_policy_version(_bound(), "3"), Reason.STALE_POLICY),
    ],
)
def test_gate(state: ConsentState, expected: Reason) -> None:
    d = consent.decide(state, A)
    assert d.reason is expected
    assert d.allowed == (expected is Reason.OK)
    assert (d.grant is not None) == d.allowed


def test_default_is_opt_in_for_every_purpose() -> None:
    s = _bound(grant=False)
    assert all(not consent.decide(s, p).allowed for p in Purpose)


def test_grant_records_policy_version_and_a_regrant_is_a_new_grant() -> None:
    s = _bound()
    g = s.grants[A]
    assert (g.policy_version, g.granted_at, g.source) == ("2", 10.0, "local")
    again = consent.grant(s, A, now=99.0, source="cloud").grants[A]
    assert (again.granted_at, again.source) == (99.0, "cloud")  # the receipt names the latest
    fresh = consent.grant(consent.with_policy_version(s, "3"), A, now=50.0, source="cloud")
    assert consent.decide(fresh, A).reason is Reason.OK
    assert fresh.grants[A].policy_version == "3"


def test_rebind_carries_no_grants_but_keeps_a_suspension() -> None:
    again = consent.bound(consent.unbound(_bound()), minor=False)
    assert consent.decide(again, A).reason is Reason.NOT_GRANTED
    held = consent.bound(consent.unbound(consent.suspended(_bound(), True)), minor=False)
    assert held.suspended  # P13: until the cloud resumes collection


ALL_STATES = list(State)
ALL_EVENTS = list(Event)


@pytest.mark.parametrize("state", ALL_STATES)
@pytest.mark.parametrize("event", ALL_EVENTS)
def test_lifecycle_table_is_total_or_raises(state: State, event: Event) -> None:
    if (state, event) in lifecycle.TRANSITIONS:
        step = lifecycle.step(state, event)
        assert step.state in State
    else:
        with pytest.raises(IllegalTransition) as info:
            lifecycle.step(state, event)
        assert (info.value.state, info.value.event) == (state.value, event.value)


@pytest.mark.parametrize(
    ("state", "event", "new", "effect"),
    [
        (State.FACTORY_NEW, Event.BIND, State.ACTIVATION_DUE, "activation-due"),
        (State.ACTIVATION_DUE, Event.ACTIVATE, State.ACTIVATED, "none"),
        (State.ACTIVATED, Event.FIRMWARE_UPDATE, State.ACTIVATION_DUE, "activation-due"),
        (State.ACTIVATED, Event.UNBIND, State.FACTORY_NEW, "wipe"),
        (State.ACTIVATION_DUE, Event.ACCOUNT_CANCELLED, State.FACTORY_NEW, "wipe"),
        (State.ACTIVATED, Event.FACTORY_RESET, State.FACTORY_NEW, "wipe"),
        (State.FACTORY_NEW, Event.FACTORY_RESET, State.FACTORY_NEW, "none"),
    ],
)
def test_lifecycle_steps(state: State, event: Event, new: State, effect: str) -> None:
    assert lifecycle.step(state, event) == lifecycle.Step(new, effect)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.FACTORY_NEW, Event.UNBIND),
        (State.ACTIVATION_DUE, Event.BIND),
        (State.ACTIVATED, Event.BIND),
    ],
)
def test_lifecycle_illegal(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        lifecycle.step(state, event)


def test_retention_and_cap() -> None:
    day = 86_400.0
    assert not items.expired(A, captured_at=0.0, now=30 * day)
    assert items.expired(A, captured_at=0.0, now=30 * day + 1)
    assert items.expired(D, captured_at=0.0, now=14 * day + 1)
    assert [items.overflow(n, 3) for n in (0, 3, 4, 10)] == [0, 0, 1, 7]


@pytest.mark.parametrize(
    ("precision", "lat", "lon", "expected"),
    [
        (Precision.COUNTRY, 48.8566, 2.3522, (49.0, 2.0)),
        (Precision.REGION, 48.8566, 2.3522, (48.9, 2.4)),
        (Precision.CITY, 48.8566, 2.3522, (48.86, 2.35)),
        (Precision.REGION, -33.8688, 151.2093, (-33.9, 151.2)),
        (Precision.CITY, -0.001, -0.004, (0.0, 0.0)),
    ],
)
def test_coarsen(
    precision: Precision, lat: float, lon: float, expected: tuple[float, float]
) -> None:
    loc = coarsen(lat, lon, precision)
    assert loc is not None
    assert (loc.lat, loc.lon) == expected
    assert not finer_than(loc.lat, loc.lon, precision)
    assert finer_than(lat, lon, precision)
    # JSON carries no more digits than the level allows.
    text = json.dumps([loc.lat, loc.lon])
    assert all(
        len(part.split(".")[-1]) <= max(1, precision_digits(precision))
        for part in text.strip("[]").split(", ")
    )


def precision_digits(p: Precision) -> int:
    return {Precision.COUNTRY: 0, Precision.REGION: 1, Precision.CITY: 2}[p]


def test_precision_off_and_only_coarser() -> None:
    assert coarsen(1.0, 2.0, Precision.OFF) is None
    region = coarsen(48.8566, 2.3522, Precision.REGION)
    assert recoarsen(region, Precision.CITY) == region  # detail is gone for good
    country = recoarsen(region, Precision.COUNTRY)
    assert country is not None
    assert (country.lat, country.lon) == (49.0, 2.0)
    assert recoarsen(region, Precision.OFF) is None


@pytest.mark.parametrize(
    ("lat", "lon", "msg"),
    [(91, 0, "latitude"), (0, 181, "longitude"), (float("nan"), 0, "finite")],
)
def test_location_bad_input(lat: float, lon: float, msg: str) -> None:
    with pytest.raises(SchemaError, match=msg):
        coarsen(lat, lon, Precision.CITY)


def test_parse_precision_lists_levels() -> None:
    assert parse_precision("city") is Precision.CITY
    with pytest.raises(SchemaError, match="off, country, region, city"):
        parse_precision("street")


@pytest.mark.parametrize(
    ("raw", "leaked"),
    [
        ('File "/home/alice/app/main.py", line 3', "alice"),
        (r"C:\Users\bob\AppData\x.dll", "bob"),
        ("/Users/carol/Library/x", "carol"),
        ("contact dave@example.com failed", "dave@example.com"),
        ("auth token=abcd1234SECRETvalue", "abcd1234SECRETvalue"),
        (
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_sig",
            "eyJhbGciOiJIUzI1NiJ9",
        ),
        ("key 0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
        ("password: hunter2", "hunter2"),
        (
            "k=QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkw",
            "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkw",
        ),
    ],
)
def test_scrub_removes_personal_and_secret_text(raw: str, leaked: str) -> None:
    out = scrub(raw)
    assert leaked not in out


def test_scrub_keeps_plain_names_and_bounds_its_output() -> None:
    assert scrub("miio.fan on_tick line 42") == "miio.fan on_tick line 42"
    assert len(scrub("x" * 100_000)) <= 16_384


RECEIPT = ConsentReceipt(purpose=A, policy_version="1", granted_at="2026-01-01T00:00:00.000Z")
ACT = {
    "serial": "S1",
    "model": "m",
    "firmware_version": "1.0",
    "trigger": "first-activation",
    "location": None,
}


def test_envelope_round_trip() -> None:
    raw = build_envelope(
        kind="activation", msg_id="m1", device_id="d1", captured_at=0.0, data=ACT, receipt=RECEIPT
    )
    env = parse_envelope(raw)
    assert env.schema_ == "smartmi.activation/1"
    assert env.captured_at == "1970-01-01T00:00:00.000Z"
    assert env.consent == RECEIPT


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        ({**ACT, "imei_plain": "1"}, "imei_plain"),
        ({**ACT, "location": {"lat": 1.0, "lon": 2.0, "precision": "exact"}}, "precision"),
        ({k: v for k, v in ACT.items() if k != "serial"}, "serial"),
        ({**ACT, "serial": 5}, "serial"),
    ],
)
def test_unknown_or_bad_fields_rejected(data: dict[str, object], msg: str) -> None:
    with pytest.raises(SchemaError, match=msg):
        validate_data("activation", data)


def test_receipt_required_except_deletion() -> None:
    with pytest.raises(SchemaError, match="receipt"):
        build_envelope(
            kind="activation", msg_id="m", device_id="d", captured_at=0.0, data=ACT, receipt=None
        )
    dr = {"binding_id": "b", "reason": "unbind", "requested_at": "2026-01-01T00:00:00.000Z"}
    with pytest.raises(SchemaError, match="receipt"):
        build_envelope(
            kind="deletion-request",
            msg_id="m",
            device_id="d",
            captured_at=0.0,
            data=dr,
            receipt=RECEIPT,
        )
    raw = build_envelope(
        kind="deletion-request", msg_id="m", device_id="d", captured_at=0.0, data=dr, receipt=None
    )
    assert "consent" not in json.loads(raw)
