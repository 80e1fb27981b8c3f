"""The user's choices for one device, replayed into a timeline (SPEC §3): when each
purpose's consent was not in force and why, which policy and which location
precision held at each moment. Replayed by the checker itself, independently of the
agent's own consent gate; a narrowing choice the device could not yet have heard may
be left out of a replay (the in-flight window, ``History.judging``)."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Any, Final

from agent.core.location import DECIMALS, DEFAULT_PRECISION, Precision
from agent.core.purposes import (
    Purpose,
    rfc3339,
)
from simulator.truth import DeviceTruth

EPS = 0.002  # captured_at is RFC 3339 with milliseconds, truncated
# Precision levels from coarse to fine; `off` is coarser than any grid.
RANK: Final = {Precision.OFF: -1, **DECIMALS}
# The events that can narrow collection, so that one the device had not yet heard
# may be excused for an item already on its way.
NARROWING: Final = frozenset({"bind", "withdraw", "policy-version", "suspend", "precision", "wipe"})
# Why a purpose may not leave at a moment (one gap per reason, see Gap).
NOT_GRANTED, MINOR, SUSPENDED = "not granted", "minor", "suspended"


@dataclass(frozen=True, slots=True)
class Choice:
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


def choices(truth: DeviceTruth) -> list[Choice]:
    """The timeline in the user's order: a cloud command at its issue time, heard when
    the broker forwarded it to the device as an observer saw it, else when the cloud's
    send that may have reached the broker began (its issue time when neither is known)."""
    out = []
    for t, what, info in sorted(truth.events, key=lambda e: e[0]):
        heard = t
        command_id = info.get("command_id")
        if info.get("via") == "cloud" and isinstance(command_id, str):
            seen = truth.delivered.get(command_id, truth.sent.get(command_id, t))
            heard = max(t, seen)
        out.append(Choice(t, heard, what, info))
    return out


@dataclass(frozen=True, slots=True)
class State:
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

    def after(self, c: Choice) -> State:  # noqa: PLR0911  # one branch per event
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

    def narrowed_by(self, c: Choice, after: State) -> bool:
        """Whether going from this to ``after`` (by ``c``) narrows collection anywhere."""
        return (
            (c.what == "wipe" and self.bound)
            or RANK[after.precision] < RANK[self.precision]
            or any(after.closed(p) - self.closed(p) for p in Purpose)
        )


@dataclass(frozen=True, slots=True)
class Gap:
    """A span in which a purpose may not leave, for one reason, and the choice that
    opened it (None: it has held from the start, e.g. never granted)."""

    why: str
    start: float
    end: float | None
    choice: Choice | None

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
class Timeline:
    """One device's replayed history: when each purpose may not leave and why, the
    precision and policy version in force, and the wipes of a bound device."""

    gaps: dict[Purpose, list[Gap]]
    precision: list[tuple[float, Precision, Choice | None]]  # from then on; None: default
    policy: list[tuple[float, str]]
    wipes: list[Choice]

    def policy_at(self, t: float) -> str:
        """The policy version in force at ``t``."""
        i = bisect.bisect_right([at for at, _v in self.policy], t + EPS) - 1
        return self.policy[max(i, 0)][1]

    def precisions_over(self, first: float, last: float) -> list[tuple[Precision, Choice | None]]:
        """Every precision in force at some moment of [first, last], in time order."""
        out = []
        for i, (start, level, by) in enumerate(self.precision):
            nxt = self.precision[i + 1][0] if i + 1 < len(self.precision) else None
            if start < last and (nxt is None or nxt > first + EPS):
                out.append((level, by))
        return out


def replay(
    timeline: list[Choice], policy_version: str, excusable: frozenset[int] = frozenset()
) -> Timeline:
    """Replay the user's choices in their order (SPEC §3), except those at the indices
    in ``excusable`` that narrow what the choices before them allowed: the device could
    not yet have heard them when the item being judged left."""
    state = State(policy_version)
    opened: dict[tuple[Purpose, str], tuple[float, Choice | None]] = {
        (p, why): (-math.inf, None) for p in Purpose for why in state.closed(p)
    }
    gaps: dict[Purpose, list[Gap]] = {p: [] for p in Purpose}
    precision: list[tuple[float, Precision, Choice | None]] = [(-math.inf, state.precision, None)]
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
                gaps[p].append(Gap(why, start, c.at, by))
        if after.precision is not state.precision:
            precision.append((c.at, after.precision, c))
        if after.policy != state.policy:
            policy.append((c.at, after.policy))
        if c.what == "wipe" and state.bound:
            wipes.append(c)
        state = after
    for (p, why), (start, by) in opened.items():
        gaps[p].append(Gap(why, start, None, by))
    for spans in gaps.values():
        spans.sort(key=lambda g: g.start)
    return Timeline(gaps, precision, policy, wipes)


@dataclass
class History:
    """One device's timeline, replayed once per set of choices an item may be excused."""

    truth: DeviceTruth
    timeline: list[Choice]
    replays: dict[frozenset[int], Timeline] = field(default_factory=dict)

    @classmethod
    def of(cls, truth: DeviceTruth) -> History:
        """The history of one device's truth."""
        return cls(truth, choices(truth))

    @property
    def full(self) -> Timeline:
        """Every choice, as the user made it."""
        return self._replayed(frozenset())

    def judging(self, captured: float, left: float) -> Timeline:
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

    def _replayed(self, excusable: frozenset[int]) -> Timeline:
        tl = self.replays.get(excusable)
        if tl is None:
            tl = self.replays[excusable] = replay(
                self.timeline, self.truth.policy_version, excusable
            )
        return tl
