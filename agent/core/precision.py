"""The user's location precision (P3): choosing it, taking a position, re-coarsening.

A position is coarsened the moment it is taken (``set_location``), with the
coarsening of ``agent.core.location``; the exact value is never kept. A coarser
precision (or ``off``) reaches everything already kept before the call returns: the
stored location, and the location in the activations already queued
(``recoarsened``, applied by the shell to each one), while any activation on the
wire stops leaving. A finer precision applies from then on: what was coarsened
stays coarse. A coarser precision heard late is ``stamps.coarsened_earlier``.
"""

from __future__ import annotations

import dataclasses
import json

from agent.core.location import DECIMALS, CoarseLocation, Precision, coarsen, recoarsen
from agent.core.ordering import Stamp
from agent.core.plans import Plan, Recoarsen
from agent.core.purposes import Purpose
from agent.core.settings import Settings
from agent.core.stamps import local_stamp


def is_coarser(new: Precision, old: Precision) -> bool:
    """Whether ``new`` allows less location than ``old`` (``off`` allows none)."""
    rank = {Precision.OFF: -1, **DECIMALS}
    return rank[new] < rank[old]


def set_precision(
    s: Settings, precision: Precision, *, now: float, stamp: Stamp | None = None
) -> Plan:
    """Change the location precision; a stored location can only get coarser (P3).

    A coarser precision reaches the activations already queued before this returns:
    their location is re-coarsened (or removed, for ``off``), and any activation the
    transport holds stops leaving.
    """
    after = dataclasses.replace(
        s, precision=precision, location=recoarsen(s.location, precision)
    ).stamped("precision", stamp or local_stamp(s, now))
    if not is_coarser(precision, s.precision):
        return Plan(after)
    return Plan(after, recoarsen=(Recoarsen(precision),), stop=frozenset({Purpose.ACTIVATION}))


def set_location(s: Settings, lat: float, lon: float) -> Plan:
    """Take a position; it is coarsened here, the exact value is never kept (P3)."""
    return Plan(dataclasses.replace(s, location=coarsen(lat, lon, s.precision)))


def recoarsened(payload: bytes, precision: Precision) -> bytes:
    """A queued activation's payload with its location no finer than ``precision`` (P3)."""
    doc = json.loads(payload)
    loc = doc["data"].get("location")
    if loc is not None:
        old = CoarseLocation(float(loc["lat"]), float(loc["lon"]), Precision(loc["precision"]))
        new = recoarsen(old, precision)
        doc["data"]["location"] = None if new is None else new.to_json()
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
