"""Location coarsening (P3). Coordinates are coarsened the moment they enter the agent;
the exact value is never stored or sent. Location only travels inside activation
messages (P4), which is enforced by the schemas in ``agent.core.purposes``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

from agent.core.choices import parse_choice
from agent.errors import SchemaError


class Precision(enum.StrEnum):
    """How much location the user allows: off, or a grid of 1°, 0.1° or 0.01°."""

    OFF = "off"
    COUNTRY = "country"
    REGION = "region"
    CITY = "city"


DEFAULT_PRECISION: Final = Precision.REGION
# Decimal places kept at each level; ordered coarse -> fine.
DECIMALS: Final = {Precision.COUNTRY: 0, Precision.REGION: 1, Precision.CITY: 2}


@dataclass(frozen=True, slots=True)
class CoarseLocation:
    """A location already coarsened to ``precision``."""

    lat: float
    lon: float
    precision: Precision

    def to_json(self) -> dict[str, float | str]:
        """As it travels in an activation message (``purposes.Location``)."""
        return {"lat": self.lat, "lon": self.lon, "precision": self.precision.value}


def parse_precision(value: str) -> Precision:
    """A Precision from user input, with an error listing the valid levels."""
    return parse_choice(Precision, value, "location precision")


def _snap(value: float, decimals: int) -> float:
    # round() to a fixed number of decimals gives the closest float to the grid point,
    # which json prints with at most that many decimals.
    return round(value, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def coarsen(lat: float, lon: float, precision: Precision) -> CoarseLocation | None:
    """Snap a coordinate to the grid of ``precision``; None when positioning is off."""
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise SchemaError("latitude and longitude must be finite numbers")
    if not -90.0 <= lat <= 90.0:
        raise SchemaError(f"latitude {lat} is outside -90..90")
    if not -180.0 <= lon <= 180.0:
        raise SchemaError(f"longitude {lon} is outside -180..180")
    if precision is Precision.OFF:
        return None
    d = DECIMALS[precision]
    return CoarseLocation(_snap(lat, d), _snap(lon, d), precision)


def recoarsen(loc: CoarseLocation | None, precision: Precision) -> CoarseLocation | None:
    """Apply a new precision to a stored location: it can only get coarser, never finer."""
    if loc is None or precision is Precision.OFF:
        return None
    if DECIMALS[precision] >= DECIMALS[loc.precision]:
        return loc  # finer than what we kept: the detail is gone for good
    return coarsen(loc.lat, loc.lon, precision)


def finer_than(lat: float, lon: float, precision: Precision) -> bool:
    """True if (lat, lon) carries more detail than ``precision`` allows (the checker's test)."""
    if precision is Precision.OFF:
        return True
    scale = 10 ** DECIMALS[precision]
    return any(abs(v * scale - round(v * scale)) > 1e-6 for v in (lat, lon))
