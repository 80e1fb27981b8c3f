"""``smartmi-sim run`` as CI runs it: the smoke scenario with a few hundred devices."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from simulator.cli import main
from simulator.report import RULES, write_junit

SMOKE = Path(__file__).parents[2] / "simulator" / "scenarios" / "smoke.toml"


@pytest.mark.slow
def test_smoke_scenario_with_300_devices_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    junit = tmp_path / "junit.xml"
    rc = main(
        [
            "--dir", str(tmp_path / "dev"), "run", "--devices", "300",
            "--scenario", str(SMOKE), "--report", str(out), "--junit", str(junit),
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "pass"
    assert doc["violations"] == []
    assert doc["devices"] == 300
    assert doc["connect"]["connected"] == 300
    assert doc["seed"] == 20261122
    assert doc["delivery"]["drained"] is True
    # 240 adults and 45 leavers activate; children never send anything personal.
    assert doc["delivery"]["by_kind"]["activation"] == 285
    assert doc["delivery"]["by_kind"]["deletion-request"] == 45
    assert doc["memory"]["per_device_kib"] > 0
    assert "violations  none" in printed.out
    assert "connected 300/300" in printed.err  # the progress display
    cases = ET.parse(junit).getroot()  # noqa: S314  # our own file.findall("testcase")
    assert [c.get("name") for c in cases] == list(RULES)
    assert all(c.find("failure") is None for c in cases)


def test_junit_lists_violations_as_failed_cases(tmp_path: Path) -> None:
    doc = {
        "scenario": "s",
        "elapsed_s": 1.0,
        "violation_counts": {k: (2 if k == "lost" else 0) for k in RULES},
        "violations": [
            {"kind": "lost", "device": "d1", "msg_id": "m1", "detail": "never arrived"},
            {"kind": "lost", "device": "d2", "msg_id": "m2", "detail": "never arrived"},
        ],
    }
    path = tmp_path / "j.xml"
    write_junit(doc, path)
    root = ET.parse(path).getroot()  # noqa: S314  # our own file
    assert root.get("failures") == "1"
    failed = [c for c in root.findall("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["lost"]
    assert "d2 m2: never arrived" in (failed[0].find("failure").text or "")  # type: ignore[union-attr]


def test_bad_arguments_get_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nduration_s = 1\n')
    assert main(["--dir", str(tmp_path), "run", "--devices", "5", "--scenario", str(bad)]) == 1
    assert "groups: Field required" in capsys.readouterr().err
    assert main(["--dir", str(tmp_path), "run", "--devices", "0", "--scenario", str(SMOKE)]) == 1
    assert "--devices must be at least 1" in capsys.readouterr().err
