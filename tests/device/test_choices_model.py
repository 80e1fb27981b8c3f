"""Model-based: the user's choices in any order, judged by a reference of their own.

Hypothesis writes a history: local actions on the device, cloud commands issued while
the device cannot hear them (they wait at the broker until the next reconnect, and
arrive in any order), captures, hand-offs to the wire, acknowledgements, lost
connections and reboots. The real device code (rules, store, vault) lives it through.

The reference knows nothing of the rules: it replays the user's choices in the order
the user made them (local actions at their time, cloud commands at their issue time)
and says, for each time an item was written to the wire, whether SPEC §3 allowed it:
its purpose's consent in force at every moment from its capture to that departure, no
suspension in that span, and its location no finer than the coarsest precision in
force over the span. Any departure it refuses fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import commands
from agent.core.items import Outgoing
from agent.core.location import Precision
from agent.core.ordering import Clock
from agent.core.purposes import Purpose, parse_envelope, parse_rfc3339, rfc3339
from agent.device import CrashReport, Device
from agent.errors import AgentError
from tests.device.helpers import Rig

T0 = 1_800_000_000.0
CLOCK_ERROR_S = 0.3  # the command sync's error: choices closer than this have no known order
CRASH = CrashReport(signature="SIGSEGV", stack="Traceback:\n  File 'm.py', line 1, in f\n")
# Coarsest first; a location is "no finer than" a precision when its rank is at most that.
RANK = {"off": 0, "country": 1, "region": 2, "city": 3}
LEVELS = ["off", "country", "region", "city"]
PURPOSES = [p.value for p in Purpose]


# -- the reference: the user's choices, replayed in their order -----------------------------
@dataclass
class UserState:
    """What the user had chosen at some moment."""

    binding: str | None = None
    suspended: bool = False
    granted: set[str] = field(default_factory=set)
    precision: str = "region"

    def apply(self, what: str, value: str, binding: str | None) -> None:
        """A choice; a cloud choice names the binding it was made for (None: any)."""
        if binding is not None and binding != self.binding:
            return  # made for a binding that had already ended: not this user's choice
        if what == "bind":
            self.binding, self.granted = value, set()
        elif what == "wipe":
            self.binding, self.granted, self.precision = None, set(), "region"
        elif what == "grant":
            self.granted.add(value)
        elif what == "withdraw":
            self.granted.discard(value)
        elif what == "suspend":
            self.suspended = True
        elif what == "resume":
            self.suspended = False
        elif what == "precision":
            self.precision = value

    def allows(self, purpose: str) -> bool:
        return self.binding is not None and not self.suspended and purpose in self.granted


@dataclass
class Reference:
    """The user's choices, each at the time the user made it (the cloud's clock)."""

    choices: list[tuple[float, str, str, str | None]] = field(default_factory=list)

    def chose(self, t: float, what: str, value: str = "", binding: str | None = None) -> None:
        self.choices.append((t, what, value, binding))

    def states(self, start: float, end: float) -> Iterator[UserState]:
        """The user's state at ``start`` and after every choice up to ``end``."""
        state = UserState()
        ordered = sorted(self.choices, key=lambda c: c[0])
        for t, what, value, binding in ordered:
            if t > start:
                break
            state.apply(what, value, binding)
        yield state
        for t, what, value, binding in ordered:
            if start < t <= end:
                state.apply(what, value, binding)
                yield state

    def refuses(self, purpose: str, location: Any, captured: float, left: float) -> str | None:
        """Why an item captured at ``captured`` may not leave at ``left``; None if it may."""
        for state in self.states(captured, left):
            if not state.allows(purpose):
                return f"{purpose} not in force at some moment in [{captured}, {left}]"
            if purpose == "activation":
                rank = RANK[state.precision]
                if location is not None and (rank == 0 or RANK[location["precision"]] > rank):
                    return f"location finer than {state.precision} within the span"
        return None


# -- the history, lived by the real device ---------------------------------------------------
NONE = st.just("")
STEP = st.one_of(
    st.tuples(st.just("local"), st.sampled_from(["grant", "withdraw"]), st.sampled_from(PURPOSES)),
    st.tuples(st.just("local"), st.just("precision"), st.sampled_from(LEVELS)),
    st.tuples(st.just("local"), st.sampled_from(["bind", "unbind", "crash", "location"]), NONE),
    st.tuples(st.just("cloud"), st.sampled_from(["grant", "withdraw"]), st.sampled_from(PURPOSES)),
    st.tuples(st.just("cloud"), st.just("precision"), st.sampled_from(LEVELS)),
    st.tuples(st.just("cloud"), st.sampled_from(["suspend", "resume", "unbind"]), st.just("")),
    st.tuples(st.just("device"), st.sampled_from(["send", "send-unacked", "reconnect"]), NONE),
    st.tuples(st.just("device"), st.just("reboot"), st.just("")),
)  # fmt: skip
GAPS = st.sampled_from([0.1, 0.4, 1.0, 5.0])  # 0.1 is within the clock's error: no known order


@dataclass
class World:
    """One device, the broker's queue of commands for it, and the reference."""

    rig: Rig
    offset: float  # device clock minus the cloud's
    ref: Reference = field(default_factory=Reference)
    t: float = T0  # the cloud's (true) time
    pending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    binding: int = 0
    commands: int = 0
    departures: list[tuple[Outgoing, float]] = field(default_factory=list)

    @property
    def core(self) -> Device:
        assert self.rig.core is not None
        return self.rig.core

    @property
    def now(self) -> float:
        """The device's clock."""
        return self.t + self.offset

    def sync_clock(self) -> None:
        clock = Clock(offset=self.offset, error=CLOCK_ERROR_S, measured_at=self.now)
        self.core.clock_compared(clock, now=self.now)

    def local(self, what: str, value: str) -> None:
        core, now = self.core, self.now
        with contextlib.suppress(AgentError):  # refused: the user did not make that choice
            if what == "bind":
                value = f"b-{self.binding + 1}"
                core.bind(value, now=now)
                self.binding += 1
            elif what == "unbind":
                core.unbind(now=now)
                what = "wipe"
            elif what == "grant":
                core.grant(Purpose(value), now=now)
            elif what == "withdraw":
                core.withdraw(Purpose(value), now=now)
            elif what == "precision":
                core.set_precision(Precision(value), now=now)
            elif what == "location":
                core.set_location(48.137154, 11.575382, now=now)
                return
            elif what == "crash":
                core.capture_crash(CRASH, now=now)
                return
            self.ref.chose(self.t, what, value)

    def cloud(self, what: str, value: str) -> None:
        """The user chooses in the app: the command waits at the broker until a reconnect."""
        self.commands += 1
        doc: dict[str, Any] = {"command_id": f"c-{self.commands}", "issued_at": rfc3339(self.t)}
        owner = {"binding_id": f"b-{self.binding}"}
        if what in ("grant", "withdraw"):
            body = {**owner, "purposes": {value: what == "grant"}, "policy_version": "1"}
            self.pending.append(("consent", doc | body))
        elif what == "precision":
            self.pending.append(("location-precision", doc | owner | {"precision": value}))
        elif what == "unbind":
            self.pending.append(("unbind", doc | owner))
        else:
            self.pending.append((f"{what}-collection", doc))
        issued = parse_rfc3339(doc["issued_at"])  # as the command carries it (milliseconds)
        binding = None if what in ("suspend", "resume") else owner["binding_id"]  # fleet-wide
        self.ref.chose(issued, "wipe" if what == "unbind" else what, value, binding)

    def reconnect(self, order: list[int]) -> None:
        """A new connection: what was on the wire unacknowledged is lost, the clock is
        compared, and every command waiting at the broker is heard (commands first)."""
        self.core.connection_lost(now=self.now)
        self.sync_clock()
        waiting, self.pending = self.pending, []
        for i in order:
            name, doc = waiting[i]
            with contextlib.suppress(AgentError):  # refused commands are the device's call
                self.core.take(commands.parse(name, json.dumps(doc).encode()), now=self.now)

    def send(self, *, ack: bool) -> None:
        """Hand items to the wire (they have left), acknowledged or not."""
        batch = self.core.next_batch(now=self.now, limit=8)
        self.departures += [(out, self.t) for out in batch]
        if ack:
            for out in batch:
                self.core.acknowledged(out.msg_id, now=self.now)

    def judge(self) -> list[str]:
        """Every departure the reference refuses."""
        wrong = []
        for out, left in self.departures:
            if out.purpose is None:
                continue  # a deletion request needs no consent (P10)
            captured = out.captured_at - self.offset
            location = parse_envelope(out.payload).data.get("location")
            why = self.ref.refuses(out.purpose.value, location, captured, left)
            if why is not None:
                wrong.append(f"{out.msg_id} ({out.purpose.value}): {why}")
        return wrong


@contextlib.contextmanager
def world(offset: float) -> Iterator[World]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108  # speed only
    root = Path(tempfile.mkdtemp(prefix="smartmi-model-", dir=base))
    rig = Rig(root)
    rig.now = T0 + offset
    rig.open()
    w = World(rig, offset)
    try:
        w.sync_clock()
        yield w
    finally:
        if rig.db is not None:
            rig.db.close()
        shutil.rmtree(root, ignore_errors=True)


@settings(
    max_examples=int(os.environ.get("SMARTMI_MODEL_EXAMPLES", "5000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    offset=st.sampled_from([0.0, 3.7]),
    steps=st.lists(st.tuples(GAPS, STEP), min_size=1, max_size=30),
    data=st.data(),
)
def test_no_item_leaves_against_the_users_choices(
    offset: float, steps: list[tuple[float, tuple[str, str, str]]], data: st.DataObject
) -> None:
    with world(offset) as w:
        # Most histories start where the leaks can happen: bound, location set, granted.
        w.local("bind", "")
        w.local("location", "")
        w.local("precision", "city")
        for p in PURPOSES:
            w.local("grant", p)
        for gap, (who, what, value) in steps:
            w.t += gap
            w.rig.now = w.now
            if who == "local":
                w.local(what, value)
            elif who == "cloud":
                w.cloud(what, value)
            elif what == "reboot":
                w.rig.open()
            else:
                if w.pending or what == "reconnect":
                    order = data.draw(st.permutations(range(len(w.pending))), label="arrival")
                    w.reconnect(list(order))
                if what != "reconnect":
                    w.send(ack=what == "send")
        assert w.judge() == []
