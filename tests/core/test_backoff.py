"""The reconnect schedules: capped, jittered, and slow after certificate problems."""

from __future__ import annotations

import random

import pytest

from agent.core import backoff


@pytest.mark.parametrize(
    ("schedule", "attempt", "low", "high"),
    [
        (backoff.CONNECTION, 0, 0.1, 2.0),
        (backoff.CONNECTION, 3, 0.1, 16.0),
        (backoff.CONNECTION, 50, 0.1, 30.0),  # capped, and no overflow
        (backoff.CERTIFICATE, 0, 30.0, 60.0),  # never a hot loop on a bad certificate
        (backoff.CERTIFICATE, 10, 30.0, 900.0),
        (backoff.REFUSED, 0, 2.0, 5.0),
    ],
)
def test_delays_stay_within_their_window(
    schedule: backoff.Backoff, attempt: int, low: float, high: float
) -> None:
    rng = random.Random(attempt)
    delays = [schedule.delay(attempt, rng) for _ in range(2000)]
    assert min(delays) >= low
    assert max(delays) <= high
    assert schedule.ceiling(attempt) == high
    # Full jitter: a fleet is spread over the window, not bunched at one end.
    assert max(delays) - min(delays) > 0.8 * (high - low)
