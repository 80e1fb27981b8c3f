"""The fleet keeps its schedule or says it did not: a burst of captures lets the devices
and the cloud run between captures, each scheduled event's lateness is measured, and a
run further behind than MAX_LAG_S exits with no verdict."""

from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from simulator import schedule as schedule_module
from simulator.broker import MosquittoBroker
from simulator.cli import main
from simulator.fleet import Fleet, FleetBroker
from simulator.pki import DevPki
from simulator.report import schedule
from simulator.scenario import Scenario
from simulator.schedule import MAX_LAG_S

BURST = Scenario.model_validate(
    {
        "name": "burst",
        "seed": 3,
        "duration_s": 1.5,
        "settle_s": 60,
        "groups": [
            {
                "name": "all",
                "share": 1.0,
                "events": [
                    {"at": 0.0, "action": "bind"},
                    {"at": 0.1, "action": "grant", "purpose": "diagnostics"},
                    {"at": 0.5, "action": "crash", "count": 600},
                    {"at": 0.6, "action": "suspend", "via": "cloud"},
                ],
            }
        ],
    }
)


@pytest.mark.asyncio
async def test_a_burst_of_captures_lets_the_devices_run_and_its_lag_is_measured(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    fleet = Fleet(
        BURST,
        4,
        workdir=tmp_path / "run",
        pki=pki,
        broker=FleetBroker(broker.host, broker.port),
        progress=False,
    )
    gaps: list[float] = []

    async def tick() -> None:
        """How long the event loop went without giving this task a turn, from each
        turn it got while the four bursts were being captured."""
        last = time.monotonic()
        while True:
            bursting = 8 <= fleet.stats.events_played < 12  # the four bursts
            await asyncio.sleep(0.005)
            now = time.monotonic()
            if bursting:
                gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        await fleet.run()
    finally:
        ticker.cancel()
    # 2,400 captures take a second or more here; the loop let this task run all along
    # (about every 0.1 s; a burst held it whole before: one gap the length of all four).
    assert gaps
    assert max(gaps) < 0.5, gaps
    lags = fleet.stats.event_lags_s
    assert len(lags) == 16  # every event, local and cloud, was measured
    # The suspensions at 0.6 s were issued after the four bursts due at 0.5 s.
    assert fleet.stats.max_lag_s == max(lags) > 0
    assert fleet.stats.latest.startswith(("crash at 0.50 s", "suspend at 0.60 s"))


def test_schedule_says_whether_a_run_has_a_verdict() -> None:
    kept = schedule([0.0, 0.2, MAX_LAG_S], "crash at 1.00 s for d1")
    assert kept["late"] is None
    assert kept["max_lag_s"] == MAX_LAG_S
    late = schedule([0.0, MAX_LAG_S + 0.5], "suspend at 8.00 s for d2")
    assert late["late"] is not None
    assert "fell 1.5 s behind" in late["late"]
    assert "suspend at 8.00 s for d2" in late["late"]


SMALL = """
name = "small"
duration_s = 1
settle_s = 30
[[groups]]
name = "g"
share = 1.0
events = [
    { at = 0.0, action = "bind" },
    { at = 0.2, action = "grant", purpose = "diagnostics" },
    { at = 0.4, action = "crash", count = 20 },
]
"""


def test_a_run_behind_its_schedule_exits_with_no_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No machine keeps a schedule to the microsecond: with that bound, any run is late.
    monkeypatch.setattr(schedule_module, "MAX_LAG_S", 1e-6)
    scenario = tmp_path / "small.toml"
    scenario.write_text(SMALL)
    out, junit = tmp_path / "r.json", tmp_path / "j.xml"
    rc = main(
        [
            "--dir", str(tmp_path / "dev"), "run", "--devices", "3",
            "--scenario", str(scenario), "--report", str(out), "--junit", str(junit),
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 3
    assert "Traceback" not in printed.err
    [line] = [x for x in printed.err.splitlines() if x.startswith("smartmi-sim:")]
    assert line.startswith("smartmi-sim: no verdict: the fleet fell ")
    assert "NO VERDICT" in printed.out
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "no-verdict"
    assert doc["violations"] == []  # what the checker found is still reported
    assert doc["schedule"]["events"] == 9
    cases = ET.parse(junit).getroot()  # noqa: S314  # our own file
    [failed] = [c for c in cases.findall("testcase") if c.find("failure") is not None]
    assert failed.get("name") == "schedule"
