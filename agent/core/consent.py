"""Consent: who granted what, under which policy, and the one gate every path asks.

Pure: no clock, no I/O. ``decide`` is the single answer to "may an item of purpose
X be captured or sent now?" (P1, P2, P5, P6, P13); the device core calls it at
capture and again at hand-off to the transport.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.core.purposes import ConsentReceipt, Purpose, rfc3339

Source = Literal["local", "cloud"]


class Reason(enum.StrEnum):
    """Why a purpose is or is not in force."""

    OK = "ok"
    NOT_BOUND = "not-bound"
    MINOR = "minor"  # P5
    SUSPENDED = "suspended"  # P13
    NOT_GRANTED = "not-granted"  # P1 opt-in, P2 withdrawal
    STALE_POLICY = "stale-policy"  # P6
    NOT_DURABLE = "not-durable"  # a narrowing or wipe is not yet on disk: fail closed


@dataclass(frozen=True, slots=True)
class Grant:
    """One purpose's consent, with the policy version it was given under (P6)."""

    purpose: Purpose
    granted_at: float
    policy_version: str
    source: Source

    def receipt(self) -> ConsentReceipt:
        """The receipt carried in every message sent under this grant."""
        return ConsentReceipt(
            purpose=self.purpose,
            policy_version=self.policy_version,
            granted_at=rfc3339(self.granted_at),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer; ``grant`` is the grant in force when allowed."""

    allowed: bool
    reason: Reason
    grant: Grant | None = None


@dataclass(frozen=True, slots=True)
class ConsentState:
    """Everything consent depends on. Default: bound to nobody, nothing granted (opt-in)."""

    policy_version: str
    bound: bool = False
    minor: bool = False
    suspended: bool = False
    grants: Mapping[Purpose, Grant] = field(default_factory=dict)


def decide(state: ConsentState, purpose: Purpose) -> Decision:
    """May an item of ``purpose`` be captured or sent now?"""
    if not state.bound:
        return Decision(allowed=False, reason=Reason.NOT_BOUND)
    if state.minor:
        return Decision(allowed=False, reason=Reason.MINOR)
    if state.suspended:
        return Decision(allowed=False, reason=Reason.SUSPENDED)
    grant = state.grants.get(purpose)
    if grant is None:
        return Decision(allowed=False, reason=Reason.NOT_GRANTED)
    if grant.policy_version != state.policy_version:
        return Decision(allowed=False, reason=Reason.STALE_POLICY)
    return Decision(allowed=True, reason=Reason.OK, grant=grant)


def grant(state: ConsentState, purpose: Purpose, *, now: float, source: Source) -> ConsentState:
    """Record a grant under the current policy version; a repeated grant is a new grant
    (SPEC §3: the receipt names the latest one)."""
    grants = dict(state.grants)
    grants[purpose] = Grant(purpose, now, state.policy_version, source)
    return dataclasses.replace(state, grants=grants)


def withdraw(state: ConsentState, purpose: Purpose) -> ConsentState:
    """Remove a purpose's grant (P2)."""
    if purpose not in state.grants:
        return state
    grants = {p: g for p, g in state.grants.items() if p != purpose}
    return dataclasses.replace(state, grants=grants)


def with_policy_version(state: ConsentState, version: str) -> ConsentState:
    """The configured policy version changed: older grants stop counting (P6)."""
    return dataclasses.replace(state, policy_version=version)


def bound(state: ConsentState, *, minor: bool) -> ConsentState:
    """A fresh binding: no grants carried over from any earlier owner; a suspension
    stays (P13: it lasts until the cloud resumes collection)."""
    return ConsentState(
        policy_version=state.policy_version, bound=True, minor=minor, suspended=state.suspended
    )


def unbound(state: ConsentState) -> ConsentState:
    """After a wipe: nothing bound, nothing granted; a suspension stays (P13)."""
    return ConsentState(policy_version=state.policy_version, suspended=state.suspended)


def suspended(state: ConsentState, value: bool) -> ConsentState:
    """Cloud suspend/resume of all personal-data collection (P13)."""
    return dataclasses.replace(state, suspended=value)
