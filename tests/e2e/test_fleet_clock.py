"""The fleet's ground truth is on the real clock even when a device's clock is not: the
times a device reports (queued, acknowledged) are put back on the real one, as the
checker compares them with the observer's, the backend's and the outage windows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from simulator.broker import MosquittoBroker
from simulator.fleet import Fleet
from simulator.pki import DevPki
from simulator.scenario import Scenario

pytestmark = pytest.mark.asyncio

EIGHT_DAYS = 8 * 86_400
SCENARIO = Scenario.model_validate(
    {
        "name": "fast-clock",
        "seed": 6,
        "duration_s": 2.0,
        "settle_s": 30,
        "groups": [
            {
                "name": "fast",
                "share": 1.0,
                "events": [
                    {"at": 0.0, "action": "clock", "shift_s": EIGHT_DAYS},
                    {"at": 0.1, "action": "bind"},
                    {"at": 0.2, "action": "grant", "purpose": "diagnostics"},
                    {"at": 0.5, "action": "crash", "count": 3},
                    {"at": 1.0, "action": "unbind"},
                ],
            }
        ],
    }
)


async def test_a_fast_device_clock_does_not_move_the_truths_times(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    fleet = Fleet(
        SCENARIO,
        3,
        workdir=tmp_path / "run",
        pki=pki,
        broker_host=broker.host,
        broker_port=broker.port,
        progress=False,
    )
    start = time.time()
    await fleet.run()
    end = time.time()
    for dev in fleet.devices.values():
        assert dev.clock_offset == EIGHT_DAYS
        times = [at for _p, at in dev.truth.queued_items.values()] + list(dev.truth.acked.values())
        assert len(dev.truth.acked) == 4  # three crashes and the deletion request
        assert all(start <= t <= end for t in times), (start, times, end)
