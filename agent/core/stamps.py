"""When each setting last changed, on the cloud's clock, and what that covers (SPEC §3).

A local change is stamped at the device's time put on the cloud's clock
(``local_stamp``); stamps taken before the clock was ever compared are rebased when
the command sync compares it (``clock_compared``). A narrowing command certainly
older than a setting's latest change leaves the setting's value alone, but still
covers the data that existed when it was made: every item captured before that
change, on the device's clock with every error the conversion may carry
(``captured_before``), is deleted (``withdrawn_earlier``, ``suspended_earlier``) or
has its location coarsened (``coarsened_earlier``). ``agent.core.cloud`` decides
which command is heard late.

Pure: callers pass ``now``.
"""

from __future__ import annotations

import dataclasses

from agent.core.items import DropReason
from agent.core.lifecycle import State
from agent.core.location import Precision, recoarsen
from agent.core.ordering import Clock, Stamp, rebased
from agent.core.plans import ALL, Plan, Purge, Recoarsen, unchanged
from agent.core.purposes import Purpose
from agent.core.settings import Settings


def local_stamp(s: Settings, now: float) -> Stamp:
    """When a local action at device time ``now`` was made, on the cloud's clock."""
    return Stamp.local(s.control.clock, now)


def clock_compared(s: Settings, clock: Clock) -> Plan:
    """The command sync measured the device clock against the cloud's (SPEC §3); local
    stamps taken before any comparison are put on the cloud's clock with it."""
    after = s.with_control(dataclasses.replace(s.control, clock=clock))
    if not any(st.error is None for st in after.stamps.values()):
        return Plan(after, save=False)
    stamps = {k: rebased(st, clock) for k, st in after.stamps.items()}
    return Plan(
        dataclasses.replace(after, stamps=stamps), save=s.lifecycle is not State.FACTORY_NEW
    )


# -- a narrowing heard after a later widening (SPEC §3) ------------------------------
def captured_before(s: Settings, latest: Stamp, now: float) -> float:
    """The device time before which an item may have been captured before ``latest``
    (a later change of a setting) was made: ``latest`` on the device's clock, plus
    every error that conversion may carry. Where the clock was never compared, the
    order of anything captured until ``now`` is unknown: all of it (fail closed)."""
    clock = s.control.clock
    if clock is None or latest.error is None:
        return now
    return clock.to_device(latest.at) + latest.error + clock.error_at(now)


def withdrawn_earlier(s: Settings, purpose: Purpose, *, before: float) -> Plan:
    """A withdrawal made before the latest grant, heard only now: the grant stays, but
    nothing of ``purpose`` captured before that grant may leave (P2, SPEC §3)."""
    if s.lifecycle is State.FACTORY_NEW:
        return unchanged(s)
    return Plan(
        s,
        save=False,
        purge=(Purge(purpose, DropReason.WITHDRAWN, before),),
        stop=frozenset({purpose}),
    )


def suspended_earlier(s: Settings, *, before: float) -> Plan:
    """A suspension made before the latest resume, heard only now: collection stays
    resumed, but nothing captured before that resume may leave (P13, SPEC §3)."""
    return Plan(
        s,
        save=False,
        purge=tuple(Purge(p, DropReason.SUSPENDED, before) for p in Purpose),
        stop=ALL,
    )


def coarsened_earlier(s: Settings, precision: Precision, *, before: float) -> Plan:
    """A coarser precision (or ``off``) chosen before the latest precision change, heard
    only now: the precision stays, but the queued activations captured before that
    change and the stored location get no finer than ``precision`` (P3, SPEC §3).

    The stored location is coarsened whenever it was taken: when it was taken is not
    kept, so it may predate the choice (fail closed)."""
    after = dataclasses.replace(s, location=recoarsen(s.location, precision))
    return Plan(
        after,
        save=after.location != s.location,
        recoarsen=(Recoarsen(precision, before),),
        stop=frozenset({Purpose.ACTIVATION}),
    )
