"""Random sequences of user, cloud and device events against the real core and store.

Invariants checked at every hand-off to the (modelled) transport:
- no item leaves without its purpose's consent in force at that moment (P1, P2, P5, P6, P13);
- nothing captured before a wipe is ever sent after it (P9);
- nothing past its retention is sent (P7);
- no acknowledged item is sent again, across restarts;
and after every step: each wipe of a bound device leaves exactly one deletion request
pending until it is acknowledged (P10).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agent.core.items import Outgoing
from agent.core.lifecycle import State
from agent.core.purposes import POLICIES, Purpose
from agent.device import CrashReport
from agent.errors import ConsentNotInForce
from tests.device.helpers import Rig

PURPOSES = st.sampled_from(list(Purpose))


class DeviceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="smartmi-stateful-"))
        self.rig = Rig(self.dir)
        self.core = self.rig.open()
        # The model: ground truth kept independently of the code under test.
        self.bound = False
        self.minor = False
        self.suspended = False
        self.policy = "1"
        self.grants: dict[Purpose, str] = {}  # purpose -> policy version granted under
        self.pre_wipe: set[str] = set()
        self.acked: set[str] = set()
        self.acked_personal: set[str] = set()
        self.flying: dict[str, Outgoing] = {}
        self.pending_drs: set[str] = set()

    def teardown(self) -> None:
        if self.rig.db is not None:
            self.rig.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def in_force(self, purpose: Purpose) -> bool:
        return (
            self.bound
            and not self.minor
            and not self.suspended
            and self.grants.get(purpose) == self.policy
        )

    @initialize(start=st.sampled_from(["new", "collecting", "collecting"]))
    def start(self, start: str) -> None:
        """Most runs start where the interesting paths are: bound, consent in force."""
        if start == "collecting":
            self.bind(False)
            for purpose in Purpose:
                self.grant(purpose)

    # -- user / cloud events ------------------------------------------------
    @precondition(lambda self: not self.bound)
    @rule(minor=st.sampled_from([False, False, False, True]))
    def bind(self, minor: bool) -> None:
        self.core.bind("binding", now=self.rig.tick(), minor=minor)
        self.bound, self.minor, self.grants = True, minor, {}

    @precondition(lambda self: self.bound)
    @rule(purpose=PURPOSES)
    def grant(self, purpose: Purpose) -> None:
        self.core.grant(purpose, now=self.rig.tick(), source="cloud")
        self.grants[purpose] = self.policy

    @rule(purpose=PURPOSES)
    def withdraw(self, purpose: Purpose) -> None:
        self.core.withdraw(purpose, now=self.rig.tick())
        self.grants.pop(purpose, None)
        # P2: when withdraw returns, nothing of the purpose is pending anywhere.
        assert all(i.purpose is not purpose for i in self.core.store.queued(1 << 20))
        flying_now = set(self.core.in_flight())
        assert not [k for k, v in self.flying.items() if v.purpose is purpose and k in flying_now]

    @rule(value=st.booleans())
    def suspend(self, value: bool) -> None:
        # Bound or not (P13); what was handed over before stays on the wire.
        self.core.set_suspended(value, now=self.rig.tick())
        self.suspended = value

    @rule()
    def policy_change(self) -> None:
        self.policy = str(int(self.policy) + 1)
        self.core.set_policy_version(self.policy, now=self.rig.tick())
        self.rig.policy_version = self.policy

    @rule(count=st.integers(1, 4))
    def crash(self, count: int) -> None:
        for _ in range(count):
            try:
                self.core.capture_crash(CrashReport("sig", "stack"), now=self.rig.tick())
            except ConsentNotInForce:
                assert not self.in_force(Purpose.DIAGNOSTICS)
            else:
                assert self.in_force(Purpose.DIAGNOSTICS)

    @precondition(lambda self: self.bound)
    @rule(how=st.sampled_from(["unbind", "factory_reset", "account_cancelled"]))
    def wipe(self, how: str) -> None:
        self.pre_wipe |= {i.msg_id for i in self.core.store.queued(1 << 20)}
        self.pre_wipe |= {k for k, v in self.flying.items() if v.purpose is not None}
        dr = getattr(self.core, how)(now=self.rig.tick())
        assert dr is not None
        self.pending_drs.add(dr)
        self.flying = {k: v for k, v in self.flying.items() if v.purpose is None}
        self.bound, self.grants, self.minor = False, {}, False  # a suspension stays (P13)
        self.acked_personal.clear()  # the ledger went with the owner's data (P9)

    @rule()
    def firmware_update(self) -> None:
        major, minor, patch = self.rig.firmware.split(".")
        self.rig.firmware = f"{major}.{minor}.{int(patch) + 1}"  # a valid, bounded version
        self.core.firmware_updated(self.rig.firmware, now=self.rig.tick())

    @rule(seconds=st.sampled_from([-3600.0, 60.0, 86_400.0, 15 * 86_400.0, 40 * 86_400.0]))
    def clock_jump(self, seconds: float) -> None:
        self.rig.tick(seconds)

    # -- transport --------------------------------------------------------
    @rule(limit=st.integers(1, 8))
    def send(self, limit: int) -> None:
        now = self.rig.now
        for out in self.core.next_batch(now=now, limit=limit):
            assert out.msg_id not in self.acked, "acknowledged item handed off again"
            assert out.msg_id not in self.pre_wipe, "pre-wipe item handed off after wipe"
            if out.purpose is None:
                assert out.msg_id in self.pending_drs
            else:
                assert self.in_force(out.purpose), f"{out.purpose} sent without consent"
                receipt = json.loads(out.payload)["consent"]
                assert receipt["policy_version"] == self.policy
                assert out.captured_at >= now - POLICIES[out.purpose].retention_s
            self.flying[out.msg_id] = out

    @precondition(lambda self: bool(self.flying))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        msg_id = data.draw(st.sampled_from(sorted(self.flying)))
        out = self.flying.pop(msg_id)
        self.core.acknowledged(msg_id, now=self.rig.tick())
        self.acked.add(msg_id)
        if out.purpose is None:
            self.pending_drs.discard(msg_id)
        else:
            self.acked_personal.add(msg_id)

    @precondition(lambda self: bool(self.flying))
    @rule()
    def ack_all(self) -> None:
        """The broker acknowledges everything on the wire (the common case)."""
        for msg_id in sorted(self.flying):
            out = self.flying.pop(msg_id)
            self.core.acknowledged(msg_id, now=self.rig.tick(0.001))
            self.acked.add(msg_id)
            if out.purpose is None:
                self.pending_drs.discard(msg_id)
            else:
                self.acked_personal.add(msg_id)

    @rule()
    def connection_lost(self) -> None:
        self.core.connection_lost(now=self.rig.now)
        self.flying.clear()

    @rule()
    def restart(self) -> None:
        self.core = self.rig.open()
        self.flying.clear()

    # -- invariants -------------------------------------------------------
    @invariant()
    def deletion_requests_match(self) -> None:
        stored = {d.msg_id for d in self.core.store.deletion_requests()}
        assert stored == self.pending_drs

    @invariant()
    def every_acknowledged_message_is_in_the_export(self) -> None:
        # P11: whatever the broker acknowledged, before or after a withdrawal or a
        # suspension, is in the user's record.
        entries = self.core.export(now=self.rig.now)["entries"]
        sent = {e["msg_id"] for e in entries if e["type"] == "sent" and e["confirmed"]}
        assert self.acked_personal <= sent

    @invariant()
    def the_queued_count_is_the_stores(self) -> None:
        # Shredded items leave the count at once, their rows when reaped: both agree.
        assert self.core.queued_count() == len(self.core.store.msg_ids())
        assert self.core.queued_count() == self.core.store.count()

    @invariant()
    def lifecycle_matches(self) -> None:
        assert (self.core.lifecycle is not State.FACTORY_NEW) == self.bound


DeviceMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDeviceMachine = DeviceMachine.TestCase
