"""The checker judged on hand-made timelines: each rule catches its violation, and a
clean history passes. A checker that cannot fail is worthless (SPEC §4)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.core.purposes import DELETION_KIND, POLICIES, Purpose, build_envelope, rfc3339
from simulator.checker import DeviceTruth, check, percentiles
from simulator.cloud import Received

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


def test_items_held_through_a_suspension_may_leave_after_the_resume() -> None:
    t = truth()
    t.log(T0 + 3, "suspend", via="cloud")
    t.log(T0 + 9, "resume", via="cloud")
    held = message("crash", "c", T0 + 2, T0 + 10)  # captured before, left after the resume
    assert kinds_of(t, [held]) == []
    during = message("crash", "d", T0 + 2, T0 + 6)  # left while suspended
    assert kinds_of(t, [during]) == ["no-consent"]
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
