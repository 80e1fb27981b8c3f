"""A simulated device behaves as one would, and the ground truth records it on the real
clock: a reboot comes back with the firmware an earlier firmware-update installed (and
sends no activation for it); the times a device reports on its own clock (queued,
acknowledged) are put back on the real one, as the checker compares them with the
observer's, the backend's and the outage windows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from simulator.broker import MosquittoBroker
from simulator.fleet import FIRMWARE, Fleet, FleetBroker
from simulator.pki import DevPki
from simulator.scenario import Scenario

pytestmark = pytest.mark.asyncio


def quiet(
    scenario: Scenario, devices: int, workdir: Path, broker: MosquittoBroker, pki: DevPki
) -> Fleet:
    """A fleet on the session broker, without progress lines."""
    return Fleet(
        scenario,
        devices,
        workdir=workdir,
        pki=pki,
        broker=FleetBroker(broker.host, broker.port),
        progress=False,
    )


REBOOTS = Scenario.model_validate(
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
    fleet = quiet(REBOOTS, 3, tmp_path / "run", broker, pki)
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


EIGHT_DAYS = 8 * 86_400
FAST_CLOCK = Scenario.model_validate(
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
    fleet = quiet(FAST_CLOCK, 3, tmp_path / "run", broker, pki)
    start = time.time()
    await fleet.run()
    end = time.time()
    for dev in fleet.devices.values():
        assert dev.clock_offset == EIGHT_DAYS
        times = [at for _p, at in dev.truth.queued_items.values()] + list(dev.truth.acked.values())
        assert len(dev.truth.acked) == 4  # three crashes and the deletion request
        assert all(start <= t <= end for t in times), (start, times, end)
