"""A run gives a verdict only when it tested what it says: it kept its schedule, and it
drained (what still waits at the end was neither delivered nor lost, so nothing was
judged about it). A violation is a verdict, drained or not."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from simulator import report
from simulator.outputs import NO_VERDICT, outcome


def doc(*, drained: bool, violations: int = 0, complete: bool = True) -> dict[str, Any]:
    found = [
        {"kind": "no-consent", "device": "d1", "msg_id": f"m{n}", "detail": "x"}
        for n in range(violations)
    ]
    return {
        "scenario": "s",
        "elapsed_s": 1.0,
        "complete": complete,
        "schedule": {"late": None},
        "delivery": {"drained": drained},
        "violations": found,
        "violation_counts": {k: (violations if k == "no-consent" else 0) for k in report.RULES},
    }


def test_a_run_that_did_not_drain_and_found_nothing_gives_no_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stuck = doc(drained=False)
    assert outcome(stuck, 0) == NO_VERDICT
    assert "smartmi-sim: no verdict: the fleet did not drain" in capsys.readouterr().err
    assert report.verdict_summary(stuck)[0].startswith("  NO VERDICT  the fleet did not drain")
    report.write_junit(stuck, tmp_path / "j.xml")
    cases = ET.parse(tmp_path / "j.xml").getroot().findall("testcase")  # noqa: S314  # ours
    [failed] = [c for c in cases if c.find("failure") is not None]
    assert failed.get("name") == "drained"


def test_a_run_whose_cloud_could_not_send_a_command_gives_no_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The devices could not hear every choice the timeline holds: judging them by it
    would blame them for the cloud's failure (a wipe without its request)."""
    cut_off = doc(drained=True, violations=1)
    cut_off["events"] = {"commands_unsent": 2}
    assert outcome(cut_off, 1) == NO_VERDICT
    assert "no verdict: 2 cloud command(s) never reached the broker" in capsys.readouterr().err
    assert report.verdict_summary(cut_off)[0].startswith("  NO VERDICT  2 cloud command(s)")
    report.write_junit(cut_off, tmp_path / "j.xml")
    cases = ET.parse(tmp_path / "j.xml").getroot().findall("testcase")  # noqa: S314  # ours
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["commands", "no-consent"]


@pytest.mark.parametrize(
    ("drained", "violations", "complete", "code"),
    [
        (True, 0, True, 0),  # a verdict: pass
        (False, 2, True, 1),  # a violation is a violation, drained or not
        (True, 2, True, 1),
        (False, 0, False, 0),  # interrupted: the CLI says so (130); nothing counted lost
    ],
)
def test_otherwise_the_verdict_stands(
    drained: bool,
    violations: int,
    complete: bool,
    code: int,
) -> None:
    assert (
        outcome(doc(drained=drained, violations=violations, complete=complete), violations) == code
    )
