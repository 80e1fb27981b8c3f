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

When an item *left* comes from evidence that is not the agent's (SPEC §4): the
observer's capture at the broker when one ran, else the broker's PUBACK as the fleet
recorded it, and the backend's arrival only when there is neither.

The one allowance is for a narrowing choice the device could not yet have heard: a
cloud command is heard when the broker forwarded it to the device (the observer's
capture on ``down/``, ``DeviceTruth.delivered``; its issue time when there is none),
a local action at once. An item captured before a narrowing choice was heard and
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

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Final

from agent.core.items import DropReason
from agent.core.location import DECIMALS, DEFAULT_PRECISION, Precision, finer_than
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
# Precision levels from coarse to fine; `off` is coarser than any grid.
RANK: Final = {Precision.OFF: -1, **DECIMALS}
# The events that can narrow collection, so that one the device had not yet heard
# may be excused for an item already on its way.
NARROWING: Final = frozenset({"bind", "withdraw", "policy-version", "suspend", "precision", "wipe"})
# Why a purpose may not leave at a moment (one gap per reason, see _Gap).
NOT_GRANTED, MINOR, SUSPENDED = "not granted", "minor", "suspended"


@dataclass
class DeviceTruth:
    """What happened to one device, as the fleet carried it out."""

    device_id: str
    group: str
    policy_version: str
    # How long after the device heard a narrowing choice an item it wrote before may
    # still reach the broker (the in-flight window).
    grace_s: float = 2.0
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    queued_items: dict[str, tuple[Purpose, float]] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    dropped_items: set[str] = field(default_factory=set)
    pending_at_end: set[str] = field(default_factory=set)
    deletion_requests_pending: int = 0  # at the end of the run, not yet acknowledged
    # When an observer at the broker first saw each message (a capture), if one ran.
    seen_at: dict[str, float] = field(default_factory=dict)
    # When the observer subscribed to the device's down/ first saw each cloud command
    # (by command_id): when the broker forwarded it, so the earliest the device heard it.
    delivered: dict[str, float] = field(default_factory=dict)

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


@dataclass(frozen=True, slots=True)
class _Choice:
    """One event of a device's timeline, in the user's order."""

    at: float  # when the user made it: a local action's time, a cloud command's issue time
    heard: float  # the earliest the device could know of it
    what: str
    info: dict[str, Any]

    def source(self) -> str:
        """Who made it and when, for a violation's detail."""
        if self.info.get("via") != "cloud":
            return f"on the device at {rfc3339(self.at)}"
        text = f"by the cloud at {rfc3339(self.at)}"
        if self.heard > self.at + EPS:
            text += f", delivered {rfc3339(self.heard)}"
        return text


def _choices(truth: DeviceTruth) -> list[_Choice]:
    """The timeline in the user's order: a cloud command at its issue time, heard when
    the broker forwarded it to the device (its issue time when nobody saw that)."""
    out = []
    for t, what, info in sorted(truth.events, key=lambda e: e[0]):
        heard = t
        command_id = info.get("command_id")
        if info.get("via") == "cloud" and isinstance(command_id, str):
            heard = max(t, truth.delivered.get(command_id, t))
        out.append(_Choice(t, heard, what, info))
    return out


@dataclass(frozen=True, slots=True)
class _State:
    """The settings after a prefix of the user's choices (SPEC §2: P1, P3, P5, P6, P13)."""

    policy: str
    bound: bool = False
    minor: bool = False
    suspended: bool = False
    grants: frozenset[tuple[Purpose, str]] = frozenset()  # purpose, policy granted under
    precision: Precision = DEFAULT_PRECISION

    def closed(self, purpose: Purpose) -> frozenset[str]:
        """Why ``purpose`` may not leave now (empty: its consent is in force)."""
        why = set()
        if not self.bound or (purpose, self.policy) not in self.grants:
            why.add(NOT_GRANTED)
        if self.bound and self.minor:
            why.add(MINOR)
        if self.suspended:
            why.add(SUSPENDED)
        return frozenset(why)

    def after(self, c: _Choice) -> _State:  # noqa: PLR0911  # one branch per event
        """The settings once ``c`` is made: the latest choice wins (SPEC §3)."""
        if c.what == "bind":
            return replace(self, bound=True, minor=bool(c.info.get("minor")), grants=frozenset())
        if c.what in ("grant", "withdraw"):
            purpose = Purpose(c.info["purpose"])
            kept = frozenset(g for g in self.grants if g[0] is not purpose)
            if c.what == "grant" and self.bound:
                return replace(self, grants=kept | {(purpose, self.policy)})
            return replace(self, grants=kept) if c.what == "withdraw" else self
        if c.what == "policy-version":
            return replace(self, policy=str(c.info["version"]))
        if c.what in ("suspend", "resume"):
            return replace(self, suspended=c.what == "suspend")
        if c.what == "precision":
            return replace(self, precision=Precision(c.info["level"]))
        if c.what == "wipe":
            # A wipe of a bound device resets precision (P3); a suspension lasts until
            # resumed, across wipes and rebinds (P13).
            level = DEFAULT_PRECISION if self.bound else self.precision
            return replace(self, bound=False, minor=False, grants=frozenset(), precision=level)
        return self

    def narrowed_by(self, c: _Choice, after: _State) -> bool:
        """Whether going from this to ``after`` (by ``c``) narrows collection anywhere."""
        return (
            (c.what == "wipe" and self.bound)
            or RANK[after.precision] < RANK[self.precision]
            or any(after.closed(p) - self.closed(p) for p in Purpose)
        )


@dataclass(frozen=True, slots=True)
class _Gap:
    """A span in which a purpose may not leave, for one reason, and the choice that
    opened it (None: it has held from the start, e.g. never granted)."""

    why: str
    start: float
    end: float | None
    choice: _Choice | None

    def covers(self, first: float, last: float) -> bool:
        """Whether any moment of [first, last] falls in it."""
        return self.start < last and (self.end is None or self.end > first + EPS)

    def cause(self, purpose: Purpose) -> str:
        """What was not in force, since when and by whose choice."""
        c = self.choice
        if c is None:
            return f"{purpose.value} was never granted"
        if self.why == SUSPENDED:
            return f"collection was suspended {c.source()}"
        if self.why == MINOR:
            return f"the device was bound to a minor's account {c.source()}"
        ended = {
            "withdraw": "withdrawn",
            "wipe": f"ended by {c.info.get('reason', 'a wipe')}",
            "policy-version": f"ended by policy version {c.info.get('version')}",
            "bind": "ended by a new binding",
        }.get(c.what, f"ended by {c.what}")
        return f"{purpose.value} was {ended} {c.source()}"


@dataclass
class _Timeline:
    """One device's replayed history: when each purpose may not leave and why, the
    precision and policy version in force, and the wipes of a bound device."""

    gaps: dict[Purpose, list[_Gap]]
    precision: list[tuple[float, Precision, _Choice | None]]  # from then on; None: default
    policy: list[tuple[float, str]]
    wipes: list[_Choice]

    def policy_at(self, t: float) -> str:
        """The policy version in force at ``t``."""
        i = bisect.bisect_right([at for at, _v in self.policy], t + EPS) - 1
        return self.policy[max(i, 0)][1]

    def precisions_over(self, first: float, last: float) -> list[tuple[Precision, _Choice | None]]:
        """Every precision in force at some moment of [first, last], in time order."""
        out = []
        for i, (start, level, by) in enumerate(self.precision):
            nxt = self.precision[i + 1][0] if i + 1 < len(self.precision) else None
            if start < last and (nxt is None or nxt > first + EPS):
                out.append((level, by))
        return out


def replay(
    timeline: list[_Choice], policy_version: str, excusable: frozenset[int] = frozenset()
) -> _Timeline:
    """Replay the user's choices in their order (SPEC §3), except those at the indices
    in ``excusable`` that narrow what the choices before them allowed: the device could
    not yet have heard them when the item being judged left."""
    state = _State(policy_version)
    opened: dict[tuple[Purpose, str], tuple[float, _Choice | None]] = {
        (p, why): (-math.inf, None) for p in Purpose for why in state.closed(p)
    }
    gaps: dict[Purpose, list[_Gap]] = {p: [] for p in Purpose}
    precision: list[tuple[float, Precision, _Choice | None]] = [(-math.inf, state.precision, None)]
    policy = [(-math.inf, state.policy)]
    wipes = []
    for i, c in enumerate(timeline):
        after = state.after(c)
        if i in excusable and state.narrowed_by(c, after):
            continue
        for p in Purpose:
            before, now = state.closed(p), after.closed(p)
            for why in now - before:
                opened[p, why] = (c.at, c)
            for why in before - now:
                start, by = opened.pop((p, why))
                gaps[p].append(_Gap(why, start, c.at, by))
        if after.precision is not state.precision:
            precision.append((c.at, after.precision, c))
        if after.policy != state.policy:
            policy.append((c.at, after.policy))
        if c.what == "wipe" and state.bound:
            wipes.append(c)
        state = after
    for (p, why), (start, by) in opened.items():
        gaps[p].append(_Gap(why, start, None, by))
    for spans in gaps.values():
        spans.sort(key=lambda g: g.start)
    return _Timeline(gaps, precision, policy, wipes)


@dataclass
class _History:
    """One device's timeline, replayed once per set of choices an item may be excused."""

    truth: DeviceTruth
    timeline: list[_Choice]
    replays: dict[frozenset[int], _Timeline] = field(default_factory=dict)

    @classmethod
    def of(cls, truth: DeviceTruth) -> _History:
        """The history of one device's truth."""
        return cls(truth, _choices(truth))

    @property
    def full(self) -> _Timeline:
        """Every choice, as the user made it."""
        return self._replayed(frozenset())

    def judging(self, captured: float, left: float) -> _Timeline:
        """The timeline that judges an item captured and gone at these (real) times.

        A narrowing choice made before the item left is excused when the item was
        captured before the device could hear the choice and left within the grace
        after it did: it was written before the device could act on the choice (the
        in-flight window), whatever the choice's place in the user's order.
        """
        grace = self.truth.grace_s
        excusable = frozenset(
            i
            for i, c in enumerate(self.timeline)
            if c.what in NARROWING
            and c.at < left
            and captured < c.heard + EPS
            and left <= c.heard + grace
        )
        return self._replayed(excusable)

    def _replayed(self, excusable: frozenset[int]) -> _Timeline:
        tl = self.replays.get(excusable)
        if tl is None:
            tl = self.replays[excusable] = replay(
                self.timeline, self.truth.policy_version, excusable
            )
        return tl


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


def _judge_personal(v: Verdict, history: _History, r: Received, env: Any, purpose: Purpose) -> None:
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
    histories = {d: _History.of(t) for d, t in truths.items()}
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
