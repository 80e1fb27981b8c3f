"""The checker judged on hand-made timelines: each rule catches its violation, and a
clean history passes. A checker that cannot fail is worthless (SPEC §4)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import pytest

from agent.core.purposes import DELETION_KIND, POLICIES, Purpose, build_envelope, rfc3339
from simulator.checker import check, percentiles
from simulator.cloud import Received
from simulator.truth import DeviceTruth

T0 = 1_800_000_000.0
DEV = "chk-1"


def truth(**kw: Any) -> DeviceTruth:
    t = DeviceTruth(DEV, "g", "1", **kw)
    t.log(T0, "bind", minor=False)
    t.log(T0 + 1, "grant", purpose="activation")
    t.log(T0 + 1, "grant", purpose="diagnostics")
    return t


def message(
    kind: str,
    msg_id: str,
    captured: float,
    arrived: float,
    *,
    granted: float = T0 + 1,
    policy: str = "1",
    data: dict[str, Any] | None = None,
    device: str = DEV,
) -> Received:
    purpose = next((p for p in Purpose if POLICIES[p].kind == kind), None)
    receipt = None
    if purpose is not None:
        from agent.core.purposes import ConsentReceipt

        receipt = ConsentReceipt(
            purpose=purpose, policy_version=policy, granted_at=rfc3339(granted)
        )
    if data is None:
        samples: dict[str, dict[str, Any]] = {
            "activation": {
                "serial": "S",
                "model": "m",
                "firmware_version": "1",
                "trigger": "first-activation",
                "location": {"lat": 48.1, "lon": 11.6, "precision": "region"},
            },
            "crash": {
                "ip_addresses": [],
                "default_gateway": None,
                "routes": [],
                "exception": "ValueError",
                "frames": [{"module": "fan", "function": "spin", "line": 3}],
                "signature": "ValueError in fan.spin",
                "firmware_version": "1",
                "uptime_s": 1.0,
            },
            DELETION_KIND: {
                "binding_id": "b",
                "reason": "unbind",
                "requested_at": rfc3339(captured),
            },
        }
        data = samples[kind]
    payload = build_envelope(
        kind=kind, msg_id=msg_id, device_id=device, captured_at=captured, data=data, receipt=receipt
    )
    return Received(device, kind, payload, arrived)


def kinds_of(t: DeviceTruth, received: list[Received], **kw: Any) -> list[str]:
    return sorted(v.kind for v in check({DEV: t}, received, **kw).violations)


def test_a_clean_history_passes() -> None:
    t = truth()
    t.queued_items = {"a": (Purpose.ACTIVATION, T0 + 1), "c": (Purpose.DIAGNOSTICS, T0 + 2)}
    t.log(T0 + 5, "withdraw", purpose="diagnostics")
    t.log(T0 + 6, "wipe", reason="unbind")
    received = [
        message("activation", "a", T0 + 1, T0 + 1.1),
        message("crash", "c", T0 + 2, T0 + 5.5),  # on the wire at the withdrawal
        message("crash", "c", T0 + 2, T0 + 5.6),  # a duplicate by msg_id
        message(DELETION_KIND, "d", T0 + 6, T0 + 6.1),
    ]
    verdict = check({DEV: t}, received)
    assert verdict.violations == []
    assert verdict.duplicates == 1
    assert verdict.unique == 3


@pytest.mark.parametrize(
    ("name", "setup", "expected"),
    [
        ("never granted", lambda t: t.events.pop(), ["no-consent"]),
        (
            "sent long after withdrawal",
            lambda t: t.log(T0 + 3, "withdraw", purpose="diagnostics"),
            ["no-consent"],
        ),
        ("suspended", lambda t: t.log(T0 + 1.5, "suspend"), ["no-consent"]),
        (
            "policy changed",
            lambda t: t.log(T0 + 1.5, "policy-version", version="2"),
            ["no-consent"],
        ),
    ],
)
def test_consent_violations(name: str, setup: Any, expected: list[str]) -> None:
    t = truth()
    setup(t)
    received = [message("crash", "c", T0 + 2, T0 + 20)]
    assert kinds_of(t, received) == expected, name


def test_receipt_of_another_policy_is_a_violation() -> None:
    assert kinds_of(truth(), [message("crash", "c", T0 + 2, T0 + 2, policy="0")]) == ["no-consent"]


def test_minor() -> None:
    t = DeviceTruth(DEV, "g", "1")
    t.log(T0, "bind", minor=True)
    t.log(T0 + 1, "grant", purpose="diagnostics")
    assert kinds_of(t, [message("crash", "c", T0 + 2, T0 + 2)]) == ["minor"]


def test_location_finer_than_precision() -> None:
    t = truth()
    fine = message("activation", "a", T0 + 2, T0 + 2)
    doc = json.loads(fine.payload)
    doc["data"]["location"] = {"lat": 48.14, "lon": 11.58, "precision": "city"}
    fine = Received(DEV, "activation", json.dumps(doc).encode(), T0 + 2)
    assert kinds_of(t, [fine]) == ["location"]
    t.log(T0 + 1.5, "precision", level="off")
    assert kinds_of(t, [message("activation", "a", T0 + 2, T0 + 2)]) == ["location"]


def test_data_from_before_a_wipe() -> None:
    t = truth()
    t.log(T0 + 3, "wipe", reason="factory-reset")
    received = [
        message("crash", "c", T0 + 2, T0 + 30),
        message(DELETION_KIND, "d", T0 + 3, T0 + 3),
    ]
    assert kinds_of(t, received) == ["after-wipe", "no-consent"]


def test_missing_and_unexplained_deletion_requests() -> None:
    t = truth()
    t.log(T0 + 3, "wipe", reason="unbind")
    assert kinds_of(t, []) == ["deletion-request"]  # a wipe without its request
    one = message(DELETION_KIND, "d1", T0 + 3, T0 + 3)
    assert kinds_of(t, [one]) == []
    two = [one, message(DELETION_KIND, "d2", T0 + 3, T0 + 3)]
    assert kinds_of(t, two) == ["deletion-request"]  # one no wipe caused
    t.deletion_requests_pending = 1  # still pending at the end (offline): not missing
    assert kinds_of(t, []) == []


def activation_at(msg_id: str, captured: float, left: float, precision: str) -> Received:
    grid = {"city": (48.14, 11.58), "region": (48.1, 11.6), "country": (48.0, 12.0)}
    lat, lon = grid[precision]
    data = {
        "serial": "S",
        "model": "m",
        "firmware_version": "1",
        "trigger": "first-activation",
        "location": {"lat": lat, "lon": lon, "precision": precision},
    }
    return message("activation", msg_id, captured, left, data=data)


def test_precision_is_judged_when_the_message_leaves() -> None:
    t = truth()
    t.log(T0 + 1.5, "precision", level="city")
    # Captured at city precision, then the owner chose country while it waited.
    t.log(T0 + 10, "precision", level="country", via="cloud")
    assert kinds_of(t, [activation_at("a", T0 + 2, T0 + 20, "city")]) == ["location"]
    # On the wire when the choice was made: within the grace, not a violation.
    assert kinds_of(t, [activation_at("b", T0 + 2, T0 + 10.5, "city")]) == []


def test_a_wipe_resets_precision() -> None:
    t = truth()
    t.log(T0 + 1.5, "precision", level="country")
    t.log(T0 + 5, "wipe", reason="account-cancelled", via="cloud")
    t.log(T0 + 6, "bind", minor=False)
    t.log(T0 + 7, "grant", purpose="activation")
    dr = message(DELETION_KIND, "d", T0 + 5, T0 + 5)
    # The default precision (region) is in force again after the wipe.
    assert kinds_of(t, [dr, activation_at("a", T0 + 8, T0 + 8, "region")]) == []


def test_a_suspension_lasts_across_wipes_until_resumed() -> None:
    t = truth()
    t.log(T0 + 2, "suspend", via="cloud")
    t.log(T0 + 3, "wipe", reason="unbind")
    t.log(T0 + 4, "bind", minor=False)
    t.log(T0 + 5, "grant", purpose="diagnostics")
    dr = message(DELETION_KIND, "d", T0 + 3, T0 + 3)
    assert kinds_of(t, [dr, message("crash", "c", T0 + 6, T0 + 6, granted=T0 + 5)]) == [
        "no-consent"
    ]
    t.log(T0 + 7, "resume", via="cloud")
    assert kinds_of(t, [dr, message("crash", "c", T0 + 8, T0 + 8, granted=T0 + 5)]) == []


def test_a_cloud_grant_issued_before_a_local_withdrawal_does_not_count() -> None:
    t = truth()
    t.log(T0 + 10, "grant", purpose="diagnostics", via="cloud")  # issued then, applied late
    t.log(T0 + 12, "withdraw", purpose="diagnostics")  # the owner, on the device
    late = message("crash", "c", T0 + 20, T0 + 20, granted=T0 + 10)
    assert kinds_of(t, [late]) == ["no-consent"]


def test_lost_items_and_broker_custody() -> None:
    t = truth()
    t.queued_items = {"x": (Purpose.DIAGNOSTICS, T0 + 2), "y": (Purpose.DIAGNOSTICS, T0 + 2)}
    t.dropped_items = {"y"}  # withdrawn or expired: not lost
    assert kinds_of(t, []) == ["lost"]
    t.acked = {"x": T0 + 3}
    verdict = check({DEV: t}, [], outages=[(T0 + 4, T0 + 5)])
    assert verdict.violations == []
    assert verdict.broker_custody == 1
    t.acked = {"x": T0 + 4.5}  # after the restart, before the backend was back
    assert check({DEV: t}, [], outages=[(T0 + 4, T0 + 5)]).broker_custody == 1
    t.acked = {"x": T0 + 6}  # after the backend was back: the item is lost
    assert kinds_of(t, [], outages=[(T0 + 4, T0 + 5)]) == ["lost"]


def test_malformed_and_spoofed() -> None:
    t = truth()
    received = [
        Received(DEV, "crash", b"not json", T0),
        message("crash", "c", T0 + 2, T0 + 2, device="someone-else"),
        Received(DEV, "crash", message("crash", "c2", T0 + 2, T0 + 2, device="other").payload, T0),
    ]
    assert kinds_of(t, received) == ["malformed", "spoofed", "spoofed"]


def test_percentiles() -> None:
    assert percentiles([0.3, 0.1, 0.2, 0.4]) == {"p50": 0.2, "p90": 0.4, "p99": 0.4, "max": 0.4}
    assert percentiles([]) == {}


def test_a_slow_backend_is_not_a_late_device() -> None:
    t = truth()
    t.log(T0 + 3, "withdraw", purpose="diagnostics")
    late = [message("crash", "c", T0 + 2, T0 + 20)]  # read by the backend long after
    assert kinds_of(t, late) == ["no-consent"]
    t.acked = {"c": T0 + 2.1}  # but the broker had it before the withdrawal
    assert kinds_of(t, late) == []


def test_the_brokers_stored_time_is_departure_before_any_other_evidence() -> None:
    """JetStream's timestamp (the broker's clock when it stored the message) decides:
    a late backend, a late observer and a late PUBACK record do not make a violation,
    and an early one of them does not hide a message stored after the withdrawal."""
    t = truth()
    t.log(T0 + 3, "withdraw", purpose="diagnostics")
    t.seen_at = {"c": T0 + 15}  # an observer that read late
    t.acked = {"c": T0 + 16}
    stored_early = message("crash", "c", T0 + 2, T0 + 20)
    assert kinds_of(t, [stored_early]) == ["no-consent"]
    assert kinds_of(t, [replace(stored_early, stored_at=T0 + 2.05)]) == []
    t.seen_at = {"c": T0 + 2.1}  # seen early, but the broker stored it late
    t.acked = {"c": T0 + 2.2}
    assert kinds_of(t, [stored_early]) == []
    assert kinds_of(t, [replace(stored_early, stored_at=T0 + 6)]) == ["no-consent"]


def test_a_suspension_covers_the_items_held_through_it() -> None:
    # SPEC §3: no suspension may cover any of an item's span, so what the device held
    # when the service stopped never leaves, the resume notwithstanding.
    t = truth()
    t.log(T0 + 3, "suspend", via="cloud")
    t.log(T0 + 9, "resume", via="cloud")
    held = message("crash", "c", T0 + 2, T0 + 10)  # captured before, left after the resume
    assert kinds_of(t, [held]) == ["no-consent"]
    during = message("crash", "d", T0 + 2, T0 + 6)  # left while suspended
    assert kinds_of(t, [during]) == ["no-consent"]
    assert kinds_of(t, [message("crash", "f", T0 + 9.5, T0 + 10)]) == []  # after the resume
    t.log(T0 + 12, "withdraw", purpose="diagnostics")
    t.log(T0 + 13, "grant", purpose="diagnostics")
    # Its grant ended with the withdrawal: a new grant does not cover it (P2).
    assert kinds_of(t, [message("crash", "e", T0 + 10, T0 + 20)]) == ["no-consent"]


def test_a_deletion_request_lost_in_a_broker_restart_is_the_brokers_custody() -> None:
    t = truth()
    t.log(T0 + 3, "wipe", reason="unbind")
    t.acked = {"d1": T0 + 4}  # the broker acknowledged it, then restarted at T0 + 4.5
    assert kinds_of(t, []) == ["deletion-request"]  # no window: it was lost
    verdict = check({DEV: t}, [], outages=[(T0 + 4.5, T0 + 6)])
    assert verdict.violations == []
    assert verdict.broker_custody == 1


def test_messages_of_an_earlier_run_are_counted_apart() -> None:
    # A persistent backend session may hand over what a broker kept from an earlier run
    # of the same fleet: not this run's, so neither judged nor in its latency.
    t = truth()
    t.queued_items = {"now-1": (Purpose.DIAGNOSTICS, T0 + 2)}
    old = message("crash", "old-1", T0 - 3600, T0 + 5)
    mine = message("crash", "now-1", T0 + 2, T0 + 2.1)
    verdict = check({DEV: t}, [old, mine])
    assert verdict.violations == []
    assert verdict.earlier == 1
    assert verdict.latencies_s == [pytest.approx(0.1)]
    # Unknown to this run but captured during it: judged like any other message.
    stray = message("crash", "stray-1", T0 + 0.5, T0 + 5)
    assert kinds_of(t, [stray, mine]) == ["no-consent"]
    # A lab's timeline without queued items: everything is judged.
    t.queued_items = {}
    assert kinds_of(t, [old]) == ["no-consent"]


# -- SPEC §3, "a narrowing choice covers the data that existed when it was made" ----------
# Each case: the choices after the base timeline (bound at T0, both purposes granted at
# T0 + 1, grace 2 s), when the broker forwarded each cloud command to the device
# (``delivered``), one item and when it left by each kind of evidence, and the verdict.


@dataclass(frozen=True)
class Item:
    kind: str
    captured: float
    arrived: float
    acked: float | None = None
    seen: float | None = None
    location: str | None = "region"  # an activation's location precision (None: none sent)


Choice = tuple[float, str, dict[str, Any]]

WITHDRAW_OFFLINE: list[Choice] = [
    # Withdrawn by the cloud while the device was offline, re-granted on the device
    # before it heard the withdrawal (delivered at T0 + 20).
    (T0 + 10, "withdraw", {"purpose": "diagnostics", "via": "cloud", "command_id": "w"}),
    (T0 + 12, "grant", {"purpose": "diagnostics"}),
]
OFF_OFFLINE: list[Choice] = [
    (T0 + 10, "precision", {"level": "off", "via": "cloud", "command_id": "p"}),
    (T0 + 12, "precision", {"level": "city"}),
]
SUSPEND_OFFLINE: list[Choice] = [
    (T0 + 10, "suspend", {"via": "cloud", "command_id": "s"}),
    (T0 + 12, "resume", {"via": "cloud", "command_id": "r"}),
]
WITHDRAW_LATE: list[Choice] = [  # the broker forwarded it 5 s after it was issued
    (T0 + 10, "withdraw", {"purpose": "diagnostics", "via": "cloud", "command_id": "w"}),
]
SUSPEND: list[Choice] = [
    (T0 + 3, "suspend", {"via": "cloud"}),
    (T0 + 9, "resume", {"via": "cloud"}),
]
WITHDRAW_LOCAL: list[Choice] = [(T0 + 3, "withdraw", {"purpose": "diagnostics"})]
UNBIND_LATE: list[Choice] = [
    (T0 + 10, "wipe", {"reason": "unbind", "via": "cloud", "command_id": "u"}),
]
PRECISION_DIP: list[Choice] = [  # city, country for a while, city again: all local
    (T0 + 1.5, "precision", {"level": "city"}),
    (T0 + 10, "precision", {"level": "country"}),
    (T0 + 12, "precision", {"level": "city"}),
]
DELIVERED = {"w": T0 + 20, "p": T0 + 20, "s": T0 + 20, "r": T0 + 21}
LATE = {"w": T0 + 15, "u": T0 + 15}


@pytest.mark.parametrize(
    ("name", "choices", "delivered", "item", "expected"),
    [
        # (a) withdrawn offline, re-granted locally before the device heard it.
        ("held from before the withdrawal", WITHDRAW_OFFLINE, DELIVERED,
         Item("crash", T0 + 5, T0 + 25), ["no-consent"]),
        ("captured between issue and hearing", WITHDRAW_OFFLINE, DELIVERED,
         Item("crash", T0 + 11, T0 + 25), ["no-consent"]),
        ("captured after the re-grant", WITHDRAW_OFFLINE, DELIVERED,
         Item("crash", T0 + 13, T0 + 25), []),
        ("gone before the device could act on it", WITHDRAW_OFFLINE, DELIVERED,
         Item("crash", T0 + 5, T0 + 21.5), []),
        # (b) off offline, then city on the device.
        ("queued activation keeps its location", OFF_OFFLINE, DELIVERED,
         Item("activation", T0 + 5, T0 + 25), ["location"]),
        ("queued activation without a location", OFF_OFFLINE, DELIVERED,
         Item("activation", T0 + 5, T0 + 25, location=None), []),
        ("activation captured after city", OFF_OFFLINE, DELIVERED,
         Item("activation", T0 + 13, T0 + 25, location="city"), []),
        # A suspension heard after its resume still covers what existed before it.
        ("held through an unheard suspension", SUSPEND_OFFLINE, DELIVERED,
         Item("crash", T0 + 5, T0 + 25), ["no-consent"]),
        ("captured after the resume", SUSPEND_OFFLINE, DELIVERED,
         Item("crash", T0 + 13, T0 + 25), []),
        ("held through a suspension", SUSPEND, {}, Item("crash", T0 + 2, T0 + 10), ["no-consent"]),
        ("captured after the resume, at once", SUSPEND, {}, Item("crash", T0 + 9.5, T0 + 10), []),
        # The allowance runs from when the broker forwarded the command, not its issue.
        ("left before it was forwarded", WITHDRAW_LATE, LATE, Item("crash", T0 + 5, T0 + 11), []),
        ("left within the grace after", WITHDRAW_LATE, LATE, Item("crash", T0 + 5, T0 + 16.5), []),
        ("left past the grace after", WITHDRAW_LATE, LATE,
         Item("crash", T0 + 5, T0 + 17.5), ["no-consent"]),
        ("captured once heard", WITHDRAW_LATE, LATE,
         Item("crash", T0 + 15.5, T0 + 16), ["no-consent"]),
        ("never seen forwarded: from its issue", WITHDRAW_LATE, {},
         Item("crash", T0 + 5, T0 + 12.5), ["no-consent"]),
        ("a wipe forwarded late", UNBIND_LATE, LATE, Item("crash", T0 + 5, T0 + 16.5), []),
        ("past a late wipe's grace", UNBIND_LATE, LATE,
         Item("crash", T0 + 5, T0 + 17.5), ["after-wipe", "no-consent"]),
        # The coarsest precision over the span, even when a finer one is back in force.
        ("a coarser precision while it waited", PRECISION_DIP, {},
         Item("activation", T0 + 2, T0 + 20, location="city"), ["location"]),
        ("captured after the dip", PRECISION_DIP, {},
         Item("activation", T0 + 13, T0 + 20, location="city"), []),
        # Departure by evidence that is not the agent's: the observer's capture when it
        # saw the item, else the PUBACK, else the backend's arrival. A PUBACK time reaches
        # the record through the device: it does not override what the observer saw.
        ("a slow backend", WITHDRAW_LOCAL, {}, Item("crash", T0 + 2, T0 + 20, seen=T0 + 2.5), []),
        ("a slow backend, PUBACK only", WITHDRAW_LOCAL, {},
         Item("crash", T0 + 2, T0 + 20, acked=T0 + 2.1), []),
        ("an early PUBACK, seen late", WITHDRAW_LOCAL, {},
         Item("crash", T0 + 2, T0 + 20, acked=T0 + 2.1, seen=T0 + 19), ["no-consent"]),
        ("no evidence but the backend", WITHDRAW_LOCAL, {}, Item("crash", T0 + 2, T0 + 4.5), []),
    ],
)  # fmt: skip
def test_narrowing_covers_the_data_that_existed(
    name: str, choices: list[Choice], delivered: dict[str, float], item: Item, expected: list[str]
) -> None:
    t = truth()
    for at, what, info in choices:
        t.log(at, what, **info)
    t.delivered = dict(delivered)
    t.deletion_requests_pending = sum(1 for _at, what, _info in choices if what == "wipe")
    if item.kind == "activation":
        msg = (
            activation_at("m", item.captured, item.arrived, item.location)
            if item.location is not None
            else message("activation", "m", item.captured, item.arrived, data=NO_LOCATION)
        )
    else:
        msg = message(item.kind, "m", item.captured, item.arrived)
    if item.acked is not None:
        t.acked["m"] = item.acked
    if item.seen is not None:
        t.seen_at["m"] = item.seen
    assert kinds_of(t, [msg]) == expected, name


NO_LOCATION = {
    "serial": "S",
    "model": "m",
    "firmware_version": "1",
    "trigger": "first-activation",
    "location": None,
}


@pytest.mark.parametrize(
    ("name", "delivered", "sent", "left", "expected"),
    [
        # The cloud's send began 5 s after the issue (its connection broke first and
        # the command went again on the next one): the device cannot have heard before.
        ("left before the cloud sent it", {}, {"w": T0 + 15}, T0 + 16.5, []),
        ("left past the grace after it was sent", {}, {"w": T0 + 15}, T0 + 17.5, ["no-consent"]),
        # What the observer saw the broker forward is the better evidence: it wins.
        ("the observer saw it forwarded earlier", {"w": T0 + 11}, {"w": T0 + 15}, T0 + 16.5,
         ["no-consent"]),
        ("sent at once", {}, {"w": T0 + 10}, T0 + 12.5, ["no-consent"]),
    ],
)  # fmt: skip
def test_a_command_is_heard_no_earlier_than_the_clouds_send_began(
    name: str, delivered: dict[str, float], sent: dict[str, float], left: float, expected: list[str]
) -> None:
    t = truth()
    for at, what, info in WITHDRAW_LATE:
        t.log(at, what, **info)
    t.delivered, t.sent = dict(delivered), dict(sent)
    t.seen_at["m"] = left
    assert kinds_of(t, [message("crash", "m", T0 + 5, left + 30)]) == expected, name


def test_a_violation_says_what_was_not_in_force_and_when() -> None:
    t = truth()
    for at, what, info in WITHDRAW_OFFLINE + OFF_OFFLINE:
        t.log(at, what, **info)
    t.delivered = dict(DELIVERED)
    t.seen_at = {"c": T0 + 25}
    crash, activation = (
        message("crash", "c", T0 + 5, T0 + 26),
        activation_at("a", T0 + 5, T0 + 25, "region"),
    )
    details = {v.msg_id: v.detail for v in check({DEV: t}, [crash, activation]).violations}
    assert details["c"] == (
        f"diagnostics was withdrawn by the cloud at {rfc3339(T0 + 10)}, delivered "
        f"{rfc3339(T0 + 20)}: not in force before it left; captured {rfc3339(T0 + 5)}, "
        f"left {rfc3339(T0 + 25)} (seen at the broker)"
    )
    assert details["a"].startswith(
        f"a region location, finer than off (set by the cloud at {rfc3339(T0 + 10)}, "
        f"delivered {rfc3339(T0 + 20)})"
    )
