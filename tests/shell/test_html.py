"""The HTML report: one page that fetches nothing, with every violation's details."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.purposes import Purpose
from agent.errors import ConfigError
from simulator import html, story
from simulator.cloud import Received
from simulator.outputs import Outputs
from simulator.truth import DeviceTruth

START = 1_800_000_000.0
# Headless, and nothing reached for on a closed network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def message(n: int, kind: str, at: float) -> Received:
    payload = json.dumps({"msg_id": f"m{n}", "kind": kind}).encode()
    return Received(f"dev-{n % 3}", kind, payload, START + at)


def report(violations: list[dict[str, object]]) -> dict[str, object]:
    return {
        "scenario": "hand-made",
        "seed": 7,
        "devices": 3,
        "elapsed_s": 12.0,
        "machine": "test",
        "connect": {"connected": 3, "seconds": 0.5, "devices_per_s": 6.0, "reconnects": 1},
        "memory": {"per_device_kib": 80.0},
        "delivery": {"unique": 40, "duplicates": 0, "by_kind": {"activation": 20, "crash": 20}},
        "latency_s": {"p50": 0.01, "p99": 0.2},
        "series": {
            "started_at": START,
            "samples": [[START + t, min(3, t), 4 * t, 4 * t] for t in range(12)],
            "broker_restarts": [START + 6],
        },
        "violation_counts": {"no-consent": 1, "deletion-request": 1},
        "violations": violations,
        "verdict": "fail" if violations else "pass",
    }


def fetched(page: str) -> list[str]:
    """Whatever a browser would fetch to show the page (namespaces are not fetched)."""
    found = re.findall(r"<(?:script|link|img|iframe|object|embed)\b", page)
    found += [h for h in re.findall(r'href="([^"]*)"', page) if not h.startswith("#")]
    found += [u for u in re.findall(r"url\(([^)]*)\)", page) if not u.startswith("#")]
    found += re.findall(r"\bsrc\s*=", page) + re.findall(r"@import", page)
    return found


def test_a_failed_run_shows_each_violation_where_it_happened(tmp_path: Path) -> None:
    violations: list[dict[str, object]] = [
        {
            "kind": "no-consent",
            "device": "dev-1",
            "msg_id": "m7",
            "detail": "crash sent while <diagnostics> was withdrawn",
        },
        {"kind": "deletion-request", "device": "dev-2", "msg_id": None, "detail": "missing"},
    ]
    received = [message(n, "activation" if n % 2 else "crash", n * 0.25) for n in range(40)]
    out = tmp_path / "r.html"
    html.write(report(violations), received, [0.005 * (n + 1) for n in range(40)], out)
    page = out.read_text()
    assert fetched(page) == []
    assert page.count("<svg") == 4  # timeline, messages, latency, violations
    assert "Violations on the timeline" in page
    assert "Violations (2)" in page
    # Escaped, never markup; placed where its message arrived (m7 at 1.75 s) or at the end.
    assert "crash sent while &lt;diagnostics&gt; was withdrawn" in page
    assert "<diagnostics>" not in page
    assert "<tr><td>1.8</td><td>no-consent</td>" in page
    assert "<tr><td>12.0</td><td>deletion-request</td>" in page
    assert ">FAIL<" in page


def test_a_clean_run_says_so(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    html.write(report([]), [message(1, "activation", 1.0)], [0.01], out)
    page = out.read_text()
    assert page.count("<svg") == 3
    assert "None: every promise held." in page
    assert ">PASS<" in page
    assert fetched(page) == []


def test_the_page_gives_the_observers_verdict_and_the_events(tmp_path: Path) -> None:
    doc = report([])
    doc["capture"] = {"unique": 40, "violations": [], "agrees": True}
    doc["events"] = {"applied": 57, "refused": {"not-bound": 2, "other-binding": 1}}
    doc["connect"] = {"connected": 2, "seconds": None, "devices_per_s": None, "reconnects": 0}
    out = tmp_path / "r.html"
    html.write(doc, [message(1, "activation", 1.0)], [0.01], out)
    page = out.read_text()
    assert (
        "<th>observer</th><td>40 unique seen at the broker by the observer: 0 violations, "
        "agrees with the backend</td>"
    ) in page
    assert (
        "<th>events</th><td>57 applied; refused by the device (as designed): not-bound 2, "
        "other-binding 1</td>"
    ) in page
    assert (
        "<th>connected</th><td>2 (stopped before every device had connected: no connect rate), "
        "0 reconnects</td>"
    ) in page


def test_without_matplotlib_the_run_is_refused_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    outputs = Outputs(report=tmp_path / "r.json", html=tmp_path / "r.html")
    with pytest.raises(ConfigError, match=r"--html needs matplotlib: pip install"):
        outputs.check()


def a_withdrawal_ignored() -> tuple[DeviceTruth, list[Received], list[dict[str, object]]]:
    """A device whose user granted diagnostics, then withdrew them from the cloud; a
    crash captured after the withdrawal reached the device still left."""
    truth = DeviceTruth("dev-1", "adults", "1")
    truth.log(START + 0.0, "bind", minor=False)
    truth.log(START + 0.5, "grant", purpose="diagnostics")
    truth.log(START + 2.0, "withdraw", purpose="diagnostics", via="cloud", command_id="c-1")
    truth.delivered["c-1"] = START + 2.1
    truth.queued("early", Purpose.DIAGNOSTICS, START + 1.0)
    truth.queued("late", Purpose.DIAGNOSTICS, START + 3.0)
    truth.seen_at.update({"early": START + 1.05, "late": START + 3.1})
    received = [
        Received("dev-1", "crash", json.dumps({"msg_id": m}).encode(), START + at)
        for m, at in (("early", 1.2), ("late", 3.4))
    ]
    violations: list[dict[str, object]] = [
        {"kind": "no-consent", "device": "dev-1", "msg_id": "late", "detail": "withdrawn"}
    ]
    return truth, received, violations


def test_a_violating_device_tells_its_story_on_one_time_axis(tmp_path: Path) -> None:
    truth, received, violations = a_withdrawal_ignored()
    told = story.stories({"dev-1": truth}, received, violations)
    out = tmp_path / "r.html"
    html.write(report(violations), received, [0.2, 0.4], out, told)
    page = out.read_text()
    assert fetched(page) == []
    assert '<a href="#story-0"><code>dev-1</code></a>' in page  # the table links to it
    section = page[page.index('<section id="story-0"') :]
    assert section.count("<svg") == 1
    rows = re.findall(
        r"<tr(?: class=\"(\w+)\")?><td>([\d.]+)</td><td>([^<]+)</td><td>([^<]+)", section
    )
    assert [(flag, at, lane, what) for flag, at, lane, what in rows] == [
        ("", "0.00", "user chose", "bind"),
        ("", "0.50", "user chose", "grant diagnostics"),
        ("", "2.00", "cloud issued", "withdraw diagnostics"),
        ("", "2.10", "delivered to device", "withdraw diagnostics"),
        ("flagged", "3.00", "captured", "crash"),
        ("flagged", "3.10", "left the device", "crash (seen at the broker)"),
        ("flagged", "3.40", "reached the backend", "crash"),
    ]
    assert "1 other messages of this device are on the chart only." in section


def test_the_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (./dev.sh test installs it)")
    truth, received, violations = a_withdrawal_ignored()
    told = story.stories({"dev-1": truth}, received, violations)
    page = tmp_path / "r.html"
    html.write(report(violations), received, [0.2, 0.4], page, told)
    shot = tmp_path / "r.png"
    subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200)
    rows = [
        y
        for y, line in enumerate(pixels.tolist())
        if any(abs(r - 0xD6 / 255) < 0.03 and abs(g - 0x27 / 255) < 0.03 for r, g, *_ in line)
    ]
    # Drawn in red: the badge at the top, the marks on the charts, and the message the
    # violation names in the device's story, the last section (about 80 % down).
    assert min(rows) < len(pixels) * 0.1
    assert max(rows) > len(pixels) * 0.7
