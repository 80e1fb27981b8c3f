"""The one gate on personal data (P1): may an item of a purpose be captured or sent now?

``decide`` asks ``consent.decide`` of the device's settings. It is asked at capture
(``agent.core.capture``), again at hand-off (``may_send``, which also tells an item
past its retention, never to be sent, P7), and for the queue when the grants in force
change (``superseded``: what no grant in force covers any more, P2, P6).

Pure: callers pass ``now``.
"""

from __future__ import annotations

from typing import Literal

from agent.core import consent
from agent.core.consent import Decision
from agent.core.items import DropReason, expired
from agent.core.plans import Plan, Purge
from agent.core.purposes import Purpose
from agent.core.settings import Settings

SendVerdict = Literal["send", "hold", "expired"]


def decide(s: Settings, purpose: Purpose) -> Decision:
    """The single gate: may an item of ``purpose`` be captured or sent now?"""
    return consent.decide(s.consent, purpose)


def may_send(s: Settings, purpose: Purpose, captured_at: float, now: float) -> SendVerdict:
    """At hand-off: send, hold (no consent in force now) or expired (P7: never sent)."""
    if not decide(s, purpose).allowed:
        return "hold"
    if expired(purpose, captured_at, now):
        return "expired"
    return "send"


def superseded(s: Settings) -> tuple[Purge, ...]:
    """Items whose grant is no longer the one in force (P6: policy changed, P2 withdrawn)."""
    stale = (consent.Reason.STALE_POLICY, consent.Reason.NOT_GRANTED)
    return tuple(Purge(p, DropReason.SUPERSEDED) for p in Purpose if decide(s, p).reason in stale)


def purge_superseded(s: Settings) -> Plan:
    """Drop what no grant in force covers any more (on opening the store)."""
    return Plan(s, save=False, purge=superseded(s))
