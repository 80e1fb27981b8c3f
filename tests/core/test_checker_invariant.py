"""The checker against a reference written apart from it: random interleavings of local
and cloud choices (cloud ones forwarded to the device late or never seen forwarded) and
one item, judged by brute force over the moments of the item's span (SPEC §3).

The reference states the rule directly: an item is clean if, for some set of the
choices the device could not yet have heard (captured before it heard them, gone
within the grace after), the user's other choices in their order keep the purpose's
consent in force, no suspension, and a precision no coarser than the item's location
at every moment from its capture to its departure. It samples the state at the
capture and at every choice inside the span, and tries every such set.

Wipes and policy changes are left to the table in test_checker.py: they narrow one
setting and widen another at once, where "for some set" and the checker's rule (skip
every unheard choice that narrows) are not the same question.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.purposes import Purpose
from simulator.checker import check
from simulator.truth import DeviceTruth
from tests.core.test_checker import DEV, NO_LOCATION, T0, activation_at, message

GRACE = 2.0
LEVELS = ["off", "country", "region", "city"]  # coarse -> fine


@dataclass(frozen=True)
class Choice:
    at: float
    what: str  # grant, withdraw, suspend, resume, precision
    value: str  # the purpose, or the precision level
    cloud: bool
    heard: float  # when the device could know of it
    command_id: str | None


@st.composite
def choice_lists(draw: st.DrawFn) -> list[Choice]:
    # On a 0.5 s grid from T0 + 1.5; the item's times lie on the quarter in between, so
    # no comparison in either judge is a tie.
    slots = draw(st.lists(st.integers(0, 50), min_size=0, max_size=8, unique=True))
    out = []
    for n, slot in enumerate(sorted(slots)):
        at = T0 + 1.5 + slot * 0.5
        what = draw(st.sampled_from(["grant", "withdraw", "suspend", "resume", "precision"]))
        if what in ("grant", "withdraw"):
            value = draw(st.sampled_from(["diagnostics", "activation"]))
        elif what == "precision":
            value = draw(st.sampled_from(LEVELS))
        else:
            value = ""
        cloud = what in ("suspend", "resume") or draw(st.booleans())
        # A cloud command: forwarded 0 to 10 s after it was issued, or never seen forwarded.
        lag = draw(st.none() | st.integers(0, 20)) if cloud else 0
        cid = f"c{n}" if cloud and lag is not None else None
        out.append(Choice(at, what, value, cloud, at + (lag or 0) * 0.5, cid))
    return out


def _state(choices: list[Choice], upto: float) -> tuple[set[str], bool, int]:
    """Granted purposes, suspended, precision rank after the choices made by ``upto``."""
    granted = {"diagnostics", "activation"}  # both granted at T0 + 1
    suspended, rank = False, LEVELS.index("region")
    for c in choices:
        if c.at > upto:
            break
        if c.what == "grant":
            granted.add(c.value)
        elif c.what == "withdraw":
            granted.discard(c.value)
        elif c.what in ("suspend", "resume"):
            suspended = c.what == "suspend"
        else:
            rank = LEVELS.index(c.value)
    return granted, suspended, rank


def reference_clean(
    choices: list[Choice], purpose: str, location: str | None, captured: float, left: float
) -> bool:
    """Whether the item may have left, by brute force (see the module docstring)."""
    unheard = [
        i
        for i, c in enumerate(choices)
        if c.at < left and captured < c.heard and left <= c.heard + GRACE
    ]
    for k in range(len(unheard) + 1):
        for skipped in itertools.combinations(unheard, k):
            kept = [c for i, c in enumerate(choices) if i not in skipped]
            moments = [captured] + [c.at for c in kept if captured < c.at < left]
            if all(
                purpose in granted
                and not suspended
                and (location is None or LEVELS.index(location) <= rank)
                for granted, suspended, rank in (_state(kept, m) for m in moments)
            ):
                return True
    return False


def truth_of(choices: list[Choice]) -> DeviceTruth:
    t = DeviceTruth(DEV, "g", "1", grace_s=GRACE)
    t.log(T0, "bind", minor=False)
    t.log(T0 + 1, "grant", purpose="activation")
    t.log(T0 + 1, "grant", purpose="diagnostics")
    for c in choices:
        info: dict[str, Any] = {}
        if c.what in ("grant", "withdraw"):
            info["purpose"] = c.value
        elif c.what == "precision":
            info["level"] = c.value
        if c.cloud:
            info["via"] = "cloud"
        if c.command_id is not None:
            info["command_id"] = c.command_id
            t.delivered[c.command_id] = c.heard
        t.log(c.at, c.what, **info)
    return t


@settings(max_examples=1000, deadline=None)
@given(
    choices=choice_lists(),
    purpose=st.sampled_from(list(Purpose)),
    location=st.sampled_from([None, "country", "region", "city"]),
    captured_slot=st.integers(0, 52),
    waited=st.integers(0, 40),
)
def test_the_checker_agrees_with_a_brute_force_reference(
    choices: list[Choice],
    purpose: Purpose,
    location: str | None,
    captured_slot: int,
    waited: int,
) -> None:
    captured = T0 + 1.25 + captured_slot * 0.5
    left = captured + waited * 0.5
    if purpose is Purpose.DIAGNOSTICS:
        msg, location = message("crash", "m", captured, left), None
    elif location is None:
        msg = message("activation", "m", captured, left, data=NO_LOCATION)
    else:
        msg = activation_at("m", captured, left, location)
    verdict = check({DEV: truth_of(choices)}, [msg])
    kinds = {v.kind for v in verdict.violations}
    assert kinds <= {"no-consent", "location"}
    expected = reference_clean(choices, purpose.value, location, captured, left)
    assert (not kinds) == expected, [v.detail for v in verdict.violations]
