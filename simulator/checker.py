"""The cloud-side privacy checker: what arrived, judged against the ground-truth timeline.

Pure and clock-free. The fleet records, per device, the user's choices (local actions
at the time the user acted, cloud commands at the time the cloud issued them) and what
the device's outbox did; the checker replays that timeline itself, independently of
the agent's own consent gate, and judges every message the backend received by one
invariant, in the user's order of choices (SPEC §3): *an item may leave only if its
purpose's consent was in force at every moment from its capture to its departure, no
suspension covered any of that span, and its location is no finer than the coarsest
precision in force over that span* (``off``: no location at all). A wipe is a
narrowing too: nothing captured before it may leave after it.

When an item *left* comes from evidence that is not the agent's (SPEC §4): the time
the broker stored it (JetStream's timestamp, on a NATS cluster), else the observer's
capture at the broker when one ran, else the broker's PUBACK as the fleet recorded
it, and the backend's arrival only when there is none of them.

The ground truth is ``simulator.truth``; the replay of the user's choices into a
timeline, ``simulator.replay``.

The one allowance is for a narrowing choice the device could not yet have heard: a
cloud command is heard when the broker forwarded it to the device (the observer's
capture on ``down/``, ``DeviceTruth.delivered``), else no earlier than the cloud's send
that may have reached the broker began (``DeviceTruth.sent``: later than the issue when
the cloud's connection broke and it sent the command again), else at its issue time; a
local action at once. An item captured before a narrowing choice was heard and
gone within ``grace_s`` after it was heard is judged as if that choice had not been
made (it was on the wire, or written before the device could act); one that left
later, or was captured after the device heard the choice, is judged by it.

=======================  ===============================================================
no-consent               a personal message whose purpose's consent was not in force at
                         some moment from its capture to its departure (not granted,
                         withdrawn, ended by a wipe or a new policy, suspended), or whose
                         receipt does not match the grant in force at capture
minor                    anything personal captured while bound to a minor's account
location                 a location finer than the coarsest precision in force from its
                         capture to its departure
after-wipe               data captured before a wipe that left after it
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

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

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
from simulator.replay import (
    EPS,
    MINOR,
    RANK,
    History,
    Timeline,
)
from simulator.truth import DeviceTruth

KIND_PURPOSE = {POLICIES[p].kind: p for p in Purpose}


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


# How much earlier than a device's first event in this run a message must have been
# captured to be counted as an earlier run's (clocks of one host agree closely).
FROM_BEFORE_MARGIN_S = 60.0


def departure(truth: DeviceTruth, r: Received) -> tuple[float, str]:
    """When a message left the device, and by what evidence (SPEC §4).

    By evidence that is not the agent's, in this order: the time the broker stored it,
    by the broker's clock (JetStream keeps it per message: a NATS cluster); else the
    observer's capture at the broker, when one ran and saw the message; else the
    broker's PUBACK, as the fleet recorded it; else the backend's arrival. The order is
    a preference, not the earliest of them: a PUBACK time reaches the record through
    the device, and the backend and the observer read late under load, so none of them
    overrides the broker's own record, nor the later ones what the observer saw.
    """
    if r.stored_at is not None:
        return r.stored_at, "stored by the broker"
    msg_id = r.msg_id or ""
    if msg_id in truth.seen_at:
        return truth.seen_at[msg_id], "seen at the broker"
    if msg_id in truth.acked:
        return truth.acked[msg_id], "acknowledged by the broker"
    return r.arrived_at, "arrived at the backend"


def _judge_personal(v: Verdict, history: History, r: Received, env: Any, purpose: Purpose) -> None:
    """The SPEC §3 invariant over one item's span, from its capture to its departure."""
    truth = history.truth
    captured = truth.real_time(parse_rfc3339(env.captured_at))
    departed, evidence = departure(truth, r)
    left = max(departed, captured)  # a device clock off by more than the timeline says
    tl = history.judging(captured, left)
    dev, msg_id = truth.device_id, env.msg_id

    def span() -> str:
        return f"captured {rfc3339(captured)}, left {rfc3339(departed)} ({evidence})"

    gaps = [g for g in tl.gaps[purpose] if g.covers(captured, left)]  # by start
    if any(g.why == MINOR and g.covers(captured, captured) for g in gaps):
        v.add("minor", dev, msg_id, f"{r.kind} from a minor's device; {span()}")
        return
    receipt = env.consent
    if gaps:
        g = gaps[0]
        when = "when it was captured" if g.start <= captured else "before it left"
        v.add("no-consent", dev, msg_id, f"{g.cause(purpose)}: not in force {when}; {span()}")
    elif receipt is None or receipt.purpose != purpose:
        v.add("no-consent", dev, msg_id, f"no receipt of a {purpose.value} grant; {span()}")
    elif receipt.policy_version != (policy := tl.policy_at(captured)):
        v.add(
            "no-consent",
            dev,
            msg_id,
            f"the receipt names policy version {receipt.policy_version}, "
            f"the grant in force was under {policy}; {span()}",
        )
    for w in tl.wipes:
        if captured < w.at - EPS and w.at < left:
            v.add(
                "after-wipe",
                dev,
                msg_id,
                f"captured before the {w.info.get('reason', 'wipe')} {w.source()}; {span()}",
            )
            break
    loc = env.data.get("location") if purpose is Purpose.ACTIVATION else None
    if loc is not None:
        # No location finer than the coarsest precision in force over the span (P3).
        level, by = min(tl.precisions_over(captured, left), key=lambda pb: RANK[pb[0]])
        if level is Precision.OFF or finer_than(loc["lat"], loc["lon"], level):
            source = "by default" if by is None else f"set {by.source()}"
            if by is not None and by.what == "wipe":
                source = f"reset by the {by.info.get('reason', 'wipe')} {by.source()}"
            v.add(
                "location",
                dev,
                msg_id,
                f"a {loc.get('precision')} location, finer than {level.value} ({source}), "
                f"in force between its capture and its departure; {span()}",
            )
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
    histories = {d: History.of(t) for d, t in truths.items()}
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
        _judge_personal(v, histories[r.device_id], r, env, purpose)
    v.unique = sum(len(s) for s in seen.values())
    for d, truth in truths.items():
        _judge_deletions(v, truth, histories[d].full, deletions[d], windows)
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
    tl: Timeline,
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
