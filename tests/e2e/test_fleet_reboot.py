"""A simulated device's reboot is a restart, not an update: it comes back with the
firmware an earlier firmware-update installed, and sends no activation for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.broker import MosquittoBroker
from simulator.fleet import FIRMWARE, Fleet
from simulator.pki import DevPki
from simulator.scenario import Scenario

pytestmark = pytest.mark.asyncio

SCENARIO = Scenario.model_validate(
    {
        "name": "reboot-firmware",
        "seed": 4,
        "duration_s": 3.0,
        "settle_s": 30,
        "groups": [
            {
                "name": "all",
                "share": 1.0,
                "events": [
                    {"at": 0.0, "action": "bind"},
                    {"at": 0.1, "action": "location", "lat": 48.137, "lon": 11.575},
                    {"at": 0.2, "action": "grant", "purpose": "activation"},
                    {"at": 0.8, "action": "firmware-update", "version": "2.0.1"},
                    {"at": 1.5, "action": "reboot"},
                    {"at": 2.5, "action": "reboot"},
                ],
            }
        ],
    }
)


async def test_a_reboot_keeps_the_firmware_of_the_last_update(
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
    await fleet.run()
    assert fleet.stats.drained
    for device_id, dev in fleet.devices.items():
        assert dev.core.config.firmware_version == "2.0.1"
        sent = [
            (r.envelope()["data"]["trigger"], r.envelope()["data"]["firmware_version"])
            for r in fleet.cloud.of(device_id, "activation")
        ]
        # One activation per trigger (P4): none for the two reboots.
        assert sent == [("first-activation", FIRMWARE), ("firmware-update", "2.0.1")], device_id
