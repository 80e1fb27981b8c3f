"""A running fleet keeps what it built out of the cycle collector's walks, and gives the
process's collector back as it found it when it stops (``python -m bench.profile`` and
the fleet-start benchmark show what the walks cost at 10,000 agents)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from simulator.broker import MosquittoBroker
from simulator.fleet import RUNNING_GC_THRESHOLDS, Fleet, FleetBroker
from simulator.pki import DevPki
from simulator.scenario import Scenario

pytestmark = pytest.mark.asyncio

SCENARIO = Scenario.model_validate(
    {"name": "heap", "seed": 1, "duration_s": 0.5, "groups": [{"name": "all", "share": 1.0}]}
)


async def test_a_running_fleet_freezes_what_it_built_and_restores_the_collector(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    before = gc.get_threshold(), gc.get_freeze_count()
    seen: list[tuple[tuple[int, int, int], int, int]] = []

    async def inject(fleet: Fleet) -> None:
        connected = sum(d.transport.connected.is_set() for d in fleet.devices.values())
        seen.append((gc.get_threshold(), gc.get_freeze_count(), connected))

    fleet = Fleet(
        SCENARIO,
        5,
        workdir=tmp_path / "run",
        pki=pki,
        broker=FleetBroker(broker.host, broker.port),
        progress=False,
        inject=inject,
    )
    await fleet.run()
    [(thresholds, frozen, connected)] = seen
    assert connected == 5
    assert thresholds == RUNNING_GC_THRESHOLDS
    # Everything the fleet built (five devices' stores, keys, contexts) and more.
    assert frozen > before[1] + 1000
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
