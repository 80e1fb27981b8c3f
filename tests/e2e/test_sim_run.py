"""``smartmi-sim run`` as CI runs it: the smoke scenario with a few hundred devices."""

from __future__ import annotations

import json
import re
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from simulator.cli import main
from simulator.pki import DevPki
from simulator.report import RULES, write_junit
from tests.prometheus import prometheus_samples
from tests.shell.test_html import fetched
from tests.sim_process import interrupted_run

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
            "--metrics", str(tmp_path / "fleet.prom"), "--html", str(tmp_path / "r.html"),
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
    assert doc["memory"]["broker_peak_kib"] > 1024  # the Mosquitto it started: over 1 MiB
    assert "the broker's processes peaked at" in printed.out
    assert "violations  none" in printed.out
    assert "connected 300/300" in printed.err  # the progress display
    played = re.findall(r"events (\d+)/(\d+)", printed.err)
    assert played
    assert played[-1][0] == played[-1][1]  # every event played, refused ones too
    cases = ET.parse(junit).getroot()  # noqa: S314  # our own file.findall("testcase")
    assert [c.get("name") for c in cases] == ["schedule", "commands", "drained", *RULES]
    assert all(c.find("failure") is None for c in cases)
    page = (tmp_path / "r.html").read_text()
    assert fetched(page) == []
    assert ">PASS<" in page
    assert page.count("<svg") == 3
    figures = prometheus_samples(tmp_path / "fleet.prom")
    assert figures["smartmi_agent_agents"] == 300
    assert figures["smartmi_agent_acknowledged_total"] == doc["delivery"]["unique"] == 945
    assert figures["smartmi_agent_queued_items"] == 0
    # Consent in force at the end: the adults who did not leave (children never).
    assert figures['smartmi_agent_consent_in_force{purpose="activation"}'] == 240


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
    smoke = ["run", "--devices", "5", "--scenario", str(SMOKE)]
    assert main(["--dir", str(tmp_path), *smoke, "--workers", "0"]) == 1
    assert "--workers must be at least 1, not 0" in capsys.readouterr().err


def test_an_unreachable_broker_is_named_at_once_not_a_traceback(
    tmp_path: Path, pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a loopback port that was free a moment ago: now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ident = ["--ca", str(pki.ca_cert), "--cert", str(pki.backend.cert), "--key"]
    started = time.monotonic()
    rc = main(
        [
            "--dir", str(tmp_path), "run", "--devices", "3", "--scenario", str(SMOKE),
            "--report", str(tmp_path / "r.json"), "--broker", f"mqtts://127.0.0.1:{port}",
            *ident, str(pki.backend.key),
        ]
    )  # fmt: skip
    assert rc == 1
    assert time.monotonic() - started < 10  # the backend's own wait is 30 s
    err = capsys.readouterr().err
    assert f"cannot reach 127.0.0.1:{port}: nothing listens there" in err
    assert "smartmi-sim broker up" in err
    assert "Traceback" not in err


SCENARIOS = SMOKE.parent


@pytest.mark.slow
def test_a_capture_by_an_observer_is_judged_apart_and_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The offline-commands scenario judged twice: from the backend, and from a
    mosquitto_sub capture with the observer identity, by ``smartmi-sim check``."""
    out, timeline, capture = tmp_path / "r.json", tmp_path / "t.json", tmp_path / "cap.txt"
    rc = main(
        [
            "--dir", str(tmp_path / "dev"), "run", "--devices", "40",
            "--scenario", str(SCENARIOS / "offline-commands.toml"), "--report", str(out),
            "--timeline", str(timeline), "--capture", str(capture),
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    doc = json.loads(out.read_text())
    assert doc["capture"]["agrees"] is True
    assert doc["capture"]["unique"] == doc["delivery"]["unique"] > 0
    # The observer also saw every cloud command go down, after the cloud issued it; the
    # timeline ties each cloud choice to when the broker forwarded it.
    assert "/down/" in capture.read_text()
    devices = json.loads(timeline.read_text())["devices"]
    choices = [
        (d["delivered"], at, info["command_id"])
        for d in devices.values()
        for at, _what, info in d["events"]
        if info.get("via") == "cloud"
    ]
    assert len(choices) == 12 * 2 + 12 * 2 + 8 + 8  # two each in two groups, one in two
    for delivered, issued, command_id in choices:
        assert issued <= delivered[command_id] < issued + 60
    assert main(["check", "--timeline", str(timeline), "--capture", str(capture)]) == 0
    checked = capsys.readouterr().out
    assert "violations  none" in checked
    # The counts add up for a reader: the command syncs are named, apart from the data.
    syncs = capture.read_text().count("/up/sync ")
    assert syncs > 0
    assert f" {syncs} command syncs (not data), {doc['capture']['unique']} unique" in checked
    # The same capture with one message no device's choice allowed: the check fails.
    line = next(x for x in capture.read_text().splitlines() if "/up/crash " in x)
    stamp, topic, hexed = line.split(" ", 2)
    body = json.loads(bytes.fromhex(hexed))
    body["msg_id"] = "forged-1"
    forged = f"{float(stamp) + 3600:.6f} {topic.replace('/up/crash', '/up/activation')} "
    tampered = tmp_path / "tampered.txt"
    tampered.write_text(capture.read_text() + forged + json.dumps(body).encode().hex() + "\n")
    assert main(["check", "--timeline", str(timeline), "--capture", str(tampered)]) == 1
    assert "VIOLATIONS" in capsys.readouterr().out


def test_check_names_a_bad_capture_or_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timeline, capture = tmp_path / "t.json", tmp_path / "c.txt"
    timeline.write_text('{"schema": "smartmi.timeline/1", "devices": {}}')
    capture.write_text("not a capture line\n")
    assert main(["check", "--timeline", str(timeline), "--capture", str(capture)]) == 1
    assert "line 1 is not 'TIME TOPIC HEX [STORED]'" in capsys.readouterr().err
    capture.write_text("1.5 smartmi/v1/d/up/crash 7b7d -3\n")  # a stored time that is not one
    assert main(["check", "--timeline", str(timeline), "--capture", str(capture)]) == 1
    assert "line 1 is not 'TIME TOPIC HEX [STORED]'" in (err := capsys.readouterr().err)
    assert "stored time '-3' is not a time" in err
    assert main(["check", "--timeline", str(tmp_path / "no.json"), "--capture", str(capture)]) == 1
    assert "timeline file not found" in capsys.readouterr().err


def test_a_broker_restart_with_an_external_broker_is_refused_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "--dir", str(tmp_path), "run", "--devices", "5",
            "--scenario", str(SCENARIOS / "broker-restart.toml"),
            "--broker", "mqtts://127.0.0.1:1", "--ca", "x", "--cert", "y", "--key", "z",
        ]
    )  # fmt: skip
    assert rc == 1
    assert "can do only to a broker it started" in capsys.readouterr().err


def test_an_event_a_group_cannot_carry_out_is_a_load_time_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\nduration_s = 2\n[[groups]]\nname = "g"\nshare = 1.0\n'
        'events = [{ at = 0.0, action = "suspend", via = "local" }]\n'
    )
    assert main(["--dir", str(tmp_path), "run", "--devices", "5", "--scenario", str(bad)]) == 1
    assert "groups.0.events.0 (suspend): via: Input should be 'cloud'" in capsys.readouterr().err


def test_output_paths_are_checked_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--dir", str(tmp_path), "run", "--devices", "5", "--scenario", str(SMOKE)]
    assert main([*base, "--timeline", str(tmp_path / "no" / "t.json")]) == 1
    assert "the folder" in capsys.readouterr().err
    assert main([*base, "--capture", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()  # refused before the PKI or a broker


def test_ctrl_c_writes_a_report_marked_incomplete(tmp_path: Path) -> None:
    import signal

    report = tmp_path / "r.json"
    args = [
        "--dir", str(tmp_path / "dev"), "run", "--devices", "30", "--scenario", "mixed",
        "--report", str(report),
    ]  # fmt: skip
    rc, out, err = interrupted_run(
        args,
        after=b"] scenario ",  # the timeline is playing
        sig=signal.SIGINT,
        within_s=60,
    )
    assert rc == 130
    assert b"Traceback" not in err
    assert b"interrupted; judging what arrived so far" in err
    assert b"INCOMPLETE" in out
    doc = json.loads(report.read_text())
    assert doc["complete"] is False
    assert doc["devices"] == 30
