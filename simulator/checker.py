"""The cloud-side privacy checker: what arrived, judged against the ground-truth timeline.

Pure and clock-free. The fleet records, per device, the events it carried out
(with the time the device carried them out) and what the device's outbox did;
the checker replays that timeline itself, independently of the agent's own
consent gate, and judges every message the backend received:

=======================  ===============================================================
no-consent               a personal message whose purpose's consent was not in force
                         when it was captured, whose receipt does not match the grant
                         in force, or that arrived after the consent ended (beyond the
                         path's delay: it left the device after the withdrawal)
minor                    anything personal from a device bound to a minor's account
location                 a location finer than the precision in force at capture
after-wipe               data captured before a wipe that arrived after it
deletion-request         a wipe without its deletion request, or one not caused by a wipe
lost                     an item the device queued with consent that neither arrived,
                         nor was dropped for a reason (withdrawal, wipe, retention,
                         capacity), nor is still pending
malformed, spoofed       not a valid envelope; an envelope naming another device
=======================  ===============================================================

Duplicates by ``msg_id`` are counted, not violations (delivery is at-least-once).
An item the broker acknowledged before a broker restart, or after it but before the
backend had subscribed again (an outage window), and never delivered is counted as
``broker_custody``: the broker held it without a subscriber, not the device.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.core.items import DropReason
from agent.core.location import Precision, finer_than
from agent.core.purposes import (
    DELETION_KIND,
    POLICIES,
    Purpose,
    parse_envelope,
    parse_rfc3339,
    rfc3339,
)
from agent.errors import SchemaError
from simulator.cloud import Received

EPS = 0.002  # captured_at is RFC 3339 with milliseconds, truncated
KIND_PURPOSE = {POLICIES[p].kind: p for p in Purpose}


@dataclass
class DeviceTruth:
    """What happened to one device, as the fleet carried it out."""

    device_id: str
    group: str
    policy_version: str
    grace_s: float = 2.0  # how late a message already on the wire may still arrive
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    queued_items: dict[str, tuple[Purpose, float]] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    dropped_items: set[str] = field(default_factory=set)
    pending_at_end: set[str] = field(default_factory=set)
    deletion_requests_pending: int = 0  # at the end of the run, not yet acknowledged
    # When an observer at the broker first saw each message (a capture), if one ran.
    seen_at: dict[str, float] = field(default_factory=dict)

    # -- what the device tells us (agent.device.DeviceObserver) ------------------
    def queued(self, msg_id: str, purpose: Purpose, at: float) -> None:
        """The device queued an item with consent."""
        self.queued_items[msg_id] = (purpose, at)

    def acknowledged(self, msg_id: str, at: float) -> None:
        """The broker acknowledged an item."""
        self.acked[msg_id] = at

    def dropped(self, msg_ids: list[str], reason: DropReason) -> None:
        """The device deleted items unsent, for a reason (not lost)."""
        self.dropped_items.update(msg_ids)

    def sendable(self) -> None:
        """Not part of the ground truth."""

    def stopped(self, purposes: frozenset[Purpose]) -> None:
        """Not part of the ground truth."""

    def log(self, t: float, what: str, **info: Any) -> None:
        """Record the user's choice (or a device event) at real time ``t``."""
        self.events.append((t, what, info))

    def real_time(self, device_t: float) -> float:
        """A time the device stamped (``captured_at``), on the real clock: the device's
        clock ran ``offset_s`` ahead from each ``clock`` event on."""
        shifts = [(t, float(i["offset_s"])) for t, w, i in self.events if w == "clock"]
        offset = 0.0
        for t, off in sorted(shifts):
            if device_t - off >= t:
                offset = off
        return device_t - offset


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken promise."""

    kind: str
    device: str
    msg_id: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        """As it appears in the report."""
        return {
            "kind": self.kind,
            "device": self.device,
            "msg_id": self.msg_id,
            "detail": self.detail,
        }


@dataclass
class Verdict:
    """The checker's findings."""

    violations: list[Violation] = field(default_factory=list)
    received: int = 0
    unique: int = 0
    duplicates: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    broker_custody: int = 0
    earlier: int = 0  # messages of an earlier run, counted apart (see _from_before)
    latencies_s: list[float] = field(default_factory=list)

    def add(self, kind: str, device: str, msg_id: str | None, detail: str) -> None:
        """Record a violation."""
        self.violations.append(Violation(kind, device, msg_id, detail))


@dataclass
class _Timeline:
    """The replayed consent, precision, minor and wipe history of one device."""

    intervals: dict[Purpose, list[tuple[float, float | None, str]]]
    minor: list[tuple[float, float | None]]
    precision: list[tuple[float, Precision]]
    wipes: list[float]
    # A grant's life, from the grant to its withdrawal, the wipe or a new policy; a
    # suspension (or a minor's binding) closes the gate within it but does not end it.
    epochs: dict[Purpose, list[tuple[float, float | None]]]
    # When the cloud issued a choice (it reaches the device a path delay later).
    cloud_choices: list[float]

    def epoch_end(self, purpose: Purpose, t: float) -> float | None:
        """When the grant in force at ``t`` ended (None: it has not)."""
        for start, end in self.epochs[purpose]:
            if start - EPS <= t and (end is None or t < end + EPS):
                return end
        return t

    def in_force(self, purpose: Purpose, t: float) -> tuple[float, float | None, str] | None:
        for start, end, policy in self.intervals[purpose]:
            if start - EPS <= t and (end is None or t < end + EPS):
                return start, end, policy
        return None

    def precision_at(self, t: float) -> Precision:
        times = [p[0] for p in self.precision]
        i = bisect.bisect_right(times, t + EPS) - 1
        return self.precision[i][1] if i >= 0 else Precision.REGION

    def minor_at(self, t: float) -> bool:
        return any(s - EPS <= t and (e is None or t < e + EPS) for s, e in self.minor)


# How much earlier than a device's first event in this run a message must have been
# captured to be counted as an earlier run's (clocks of one host agree closely).
FROM_BEFORE_MARGIN_S = 60.0


def replay(truth: DeviceTruth) -> _Timeline:  # noqa: PLR0912, PLR0915  # one branch per event
    """Rebuild when each purpose's consent was in force, from the events alone (SPEC §2)."""
    intervals: dict[Purpose, list[tuple[float, float | None, str]]] = {p: [] for p in Purpose}
    open_at: dict[Purpose, tuple[float, str]] = {}
    minor_spans: list[tuple[float, float | None]] = []
    precision: list[tuple[float, Precision]] = []
    wipes: list[float] = []
    bound = minor = suspended = False
    policy = truth.policy_version
    grants: dict[Purpose, str] = {}
    epochs: dict[Purpose, list[tuple[float, float | None]]] = {p: [] for p in Purpose}
    epoch_at: dict[Purpose, float] = {}

    def settle(t: float) -> None:
        for p in Purpose:
            ok = bound and not minor and not suspended and grants.get(p) == policy
            if ok and p not in open_at:
                open_at[p] = (t, policy)
            elif not ok and p in open_at:
                start, pol = open_at.pop(p)
                intervals[p].append((start, t, pol))
            granted = bound and grants.get(p) == policy
            if granted and p not in epoch_at:
                epoch_at[p] = t
            elif not granted and p in epoch_at:
                epochs[p].append((epoch_at.pop(p), t))

    minor_since: float | None = None
    for t, what, info in sorted(truth.events, key=lambda e: e[0]):
        if what == "bind":
            bound, minor, grants = True, bool(info.get("minor")), {}
            if minor:
                minor_since = t
        elif what == "grant" and bound:
            grants[Purpose(info["purpose"])] = policy
        elif what == "withdraw":
            grants.pop(Purpose(info["purpose"]), None)
        elif what == "policy-version":
            policy = str(info["version"])
        elif what == "suspend":
            suspended = True
        elif what == "resume":
            suspended = False
        elif what == "precision":
            precision.append((t, Precision(info["level"])))
        elif what == "wipe":
            if bound:
                wipes.append(t)
                precision.append((t, Precision.REGION))  # a wipe resets precision (P3)
            # A suspension lasts until resumed, across wipes and rebinds (P13).
            bound, grants = False, {}
            if minor and minor_since is not None:
                minor_spans.append((minor_since, t))
            minor, minor_since = False, None
        settle(t)
    for p, (start, pol) in open_at.items():
        intervals[p].append((start, None, pol))
    for p, start in epoch_at.items():
        epochs[p].append((start, None))
    if minor_since is not None:
        minor_spans.append((minor_since, None))
    cloud = [t for t, _what, info in truth.events if info.get("via") == "cloud"]
    return _Timeline(intervals, minor_spans, precision, wipes, epochs, cloud)


def _left(truth: DeviceTruth, r: Received) -> float:
    """When a message had certainly left the device: its PUBACK, or its arrival.

    The backend's arrival time alone overstates it when the backend is slow to read
    (the whole fleet's uplink goes to one client); the broker acknowledged the
    PUBLISH only after receiving it, and an observer at the broker may have seen it
    earlier still, so the earliest of these bounds the departure.
    """
    msg_id = r.msg_id or ""
    return min(
        r.arrived_at,
        truth.acked.get(msg_id, r.arrived_at),
        truth.seen_at.get(msg_id, r.arrived_at),
    )


def _judge_personal(  # noqa: PLR0917  # the message and everything it is judged by
    v: Verdict, tl: _Timeline, truth: DeviceTruth, r: Received, env: Any, purpose: Purpose
) -> None:
    captured = truth.real_time(parse_rfc3339(env.captured_at))
    dev, msg_id = truth.device_id, env.msg_id
    if tl.minor_at(captured):
        v.add("minor", dev, msg_id, f"{r.kind} from a minor's device")
        return
    # A choice the cloud issued reaches the device only after the command's path delay:
    # what the device captured within the grace after it is judged as of just before.
    unheard = [t for t in tl.cloud_choices if captured - truth.grace_s <= t <= captured + EPS]
    heard = min(unheard) - 2 * EPS if unheard else captured
    span = tl.in_force(purpose, captured) or tl.in_force(purpose, heard)
    receipt = env.consent
    if span is None:
        v.add("no-consent", dev, msg_id, f"{purpose.value} consent not in force at capture")
    elif receipt is None or receipt.purpose != purpose or receipt.policy_version != span[2]:
        v.add("no-consent", dev, msg_id, "the receipt does not match the grant in force")
    else:
        # When it left (less the grace for a message already on the wire), its grant must
        # not have ended and the gate must be open: a suspension holds items, it does
        # not void their grant (P13), a withdrawal does (P2).
        left = _left(truth, r)
        on_wire = left - truth.grace_s  # the earliest it may have been written
        ended = tl.epoch_end(purpose, captured)
        if ended is not None and on_wire > ended:
            v.add(
                "no-consent",
                dev,
                msg_id,
                f"left {left - ended:.1f} s after its grant ended "
                f"(captured {rfc3339(captured)}, granted {rfc3339(span[0])})",
            )
        elif on_wire > captured and not (
            tl.in_force(purpose, left) or tl.in_force(purpose, on_wire)
        ):
            v.add("no-consent", dev, msg_id, f"left while {purpose.value} was not in force")
    for w in tl.wipes:
        if captured < w - EPS and _left(truth, r) > w + truth.grace_s:
            v.add("after-wipe", dev, msg_id, "captured before a wipe, arrived after it")
            break
    if purpose is Purpose.ACTIVATION:
        # No message leaves with a location finer than the precision in force when it
        # leaves (P3), nor than the one in force when it was captured.
        loc = env.data.get("location")
        departed = max(heard, _left(truth, r) - truth.grace_s)
        for when, at in (("captured", heard), ("left", departed)):
            precision = tl.precision_at(at)
            if loc is not None and (
                precision is Precision.OFF or finer_than(loc["lat"], loc["lon"], precision)
            ):
                v.add("location", dev, msg_id, f"finer than {precision.value} when it {when}")
                break
    v.latencies_s.append(max(0.0, r.arrived_at - captured))


def check(
    truths: dict[str, DeviceTruth],
    received: list[Received],
    *,
    outages: list[tuple[float, float]] | None = None,
) -> Verdict:
    """Judge every received message, then the deletion requests and the lost items."""
    v = Verdict(received=len(received))
    windows = sorted(outages or [])
    timelines = {d: replay(t) for d, t in truths.items()}
    seen: dict[str, set[str]] = {d: set() for d in truths}
    deletions: dict[str, set[str]] = {d: set() for d in truths}
    for r in received:
        if r.kind == "sync":
            continue  # the command sync (SPEC §3): not personal, no envelope
        v.by_kind[r.kind] += 1
        truth = truths.get(r.device_id)
        if truth is None:
            v.add("spoofed", r.device_id, None, "a device that is not in the fleet")
            continue
        try:
            env = parse_envelope(r.payload)
        except SchemaError as exc:
            v.add("malformed", r.device_id, None, str(exc)[:200])
            continue
        if env.device_id != r.device_id:
            v.add("spoofed", r.device_id, env.msg_id, f"envelope names {env.device_id!r}")
            continue
        if env.msg_id in seen[r.device_id]:
            v.duplicates += 1
            continue
        if _from_before(truth, env):
            v.earlier += 1  # counted apart: not this run's, not in its latency
            continue
        seen[r.device_id].add(env.msg_id)
        if r.kind == DELETION_KIND:
            deletions[r.device_id].add(env.msg_id)
            continue
        purpose = KIND_PURPOSE.get(r.kind)
        if purpose is None:
            v.add("malformed", r.device_id, env.msg_id, f"unknown kind {r.kind!r}")
            continue
        _judge_personal(v, timelines[r.device_id], truth, r, env, purpose)
    v.unique = sum(len(s) for s in seen.values())
    for d, truth in truths.items():
        _judge_deletions(v, truth, timelines[d], deletions[d], windows)
        _judge_lost(v, truth, seen[d], windows)
    return v


def _from_before(truth: DeviceTruth, env: Any) -> bool:
    """A message from an earlier run of the same fleet (a broker that kept it for a
    persistent backend session): its device recorded what it queued in this run, this
    is not among it, and it was captured before this run's first event for the device.
    A timeline without the queued items (a lab's) has every message judged."""
    if not truth.queued_items or not truth.events or env.msg_id in truth.queued_items:
        return False
    try:
        captured = truth.real_time(parse_rfc3339(env.captured_at))
    except (SchemaError, ValueError):
        return False
    return captured < truth.events[0][0] - FROM_BEFORE_MARGIN_S


def _judge_deletions(
    v: Verdict,
    truth: DeviceTruth,
    tl: _Timeline,
    arrived: set[str],
    windows: list[tuple[float, float]],
) -> None:
    """One deletion request per wipe of a bound device (P10): each arrived, is still
    pending at the end, or was acknowledged by a broker that lost it in a restart; and
    none arrived that no wipe caused."""
    custody = sum(
        1
        for m, t in truth.acked.items()
        if m not in truth.queued_items
        and m not in arrived
        and any(t < end for _start, end in windows)
    )
    v.broker_custody += custody
    wipes, pending = len(tl.wipes), truth.deletion_requests_pending
    if len(arrived) + pending + custody < wipes:
        missing = wipes - len(arrived) - pending - custody
        v.add("deletion-request", truth.device_id, None, f"{missing} wipe(s) without a request")
    for msg_id in sorted(arrived)[wipes:]:
        v.add("deletion-request", truth.device_id, msg_id, "a deletion request no wipe caused")


def _judge_lost(
    v: Verdict, truth: DeviceTruth, seen: set[str], windows: list[tuple[float, float]]
) -> None:
    """Queued with consent, and neither delivered, dropped for a reason nor pending."""
    missing = set(truth.queued_items) - truth.dropped_items - truth.pending_at_end - seen
    for msg_id in sorted(missing):
        acked = truth.acked.get(msg_id)
        if acked is not None and any(acked < end for _start, end in windows):
            # Acknowledged before a broker restart, or while the backend was not yet
            # subscribed again after it: the broker had it, the device did its part.
            v.broker_custody += 1
            continue
        state = "acknowledged by the broker" if acked is not None else "never acknowledged"
        v.add("lost", truth.device_id, msg_id, f"queued with consent, {state}, never arrived")


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles, in seconds rounded to the millisecond."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        rank = max(1, round(p / 100 * len(ordered)))
        out[f"p{p}"] = round(ordered[rank - 1], 3)
    out["max"] = round(ordered[-1], 3)
    return out
