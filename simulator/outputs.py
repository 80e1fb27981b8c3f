"""What a run writes (report, JUnit, timeline, capture, metrics, page), where its
files go, and the exit code its verdict gives."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.errors import ConfigError
from simulator import html, report, story
from simulator.checker import Verdict
from simulator.cloud import Received
from simulator.truth import DeviceTruth


@dataclass(frozen=True)
class Outputs:
    """Where a run writes what it found."""

    report: Path
    junit: Path | None = None
    timeline: Path | None = None
    capture: Path | None = None
    received: Path | None = None  # what the backend consumer received, as a capture
    metrics: Path | None = None  # the agents' metrics at the end, Prometheus text format
    html: Path | None = None  # the report as one self-contained page

    def check(self) -> None:
        """Every output can be written: found before the run, not after it."""
        for option, path in (
            ("--report", self.report),
            ("--junit", self.junit),
            ("--timeline", self.timeline),
            ("--capture", self.capture),
            ("--received", self.received),
            ("--metrics", self.metrics),
            ("--html", self.html),
        ):
            if path is None:
                continue
            folder = path.parent
            if path.is_dir():
                raise ConfigError(f"{option} {path} is a directory; name a file in it")
            if not folder.is_dir():
                raise ConfigError(f"{option} {path}: the folder {folder} does not exist")
            if not os.access(folder, os.W_OK):
                raise ConfigError(f"{option} {path}: the folder {folder} is not writable")
        if self.html is not None:
            html.available()

    def write(
        self,
        doc: dict[str, Any],
        received: list[Received],
        verdict: Verdict,
        truths: dict[str, DeviceTruth],
    ) -> None:
        """The report, and the JUnit file and page if asked for (the page with the
        story of each of the first devices with a violation)."""
        report.write_json(doc, self.report)
        if self.junit is not None:
            report.write_junit(doc, self.junit)
        if self.html is not None:
            told = story.stories(truths, received, doc["violations"])
            html.write(doc, received, verdict.latencies_s, self.html, told)

    def written(self) -> str:
        """The line that says where they went."""
        extra = [f"{k}: {p}" for k, p in (("JUnit", self.junit), ("page", self.html)) if p]
        return f"report: {self.report}" + "".join(f", {e}" for e in extra)


INTERRUPTED: Final = 130  # 128 + SIGINT, as a shell reports a tool stopped by Ctrl-C
NO_VERDICT: Final = 3  # the fleet fell behind its schedule (simulator.schedule.MAX_LAG_S)
KEEP_RUNS: Final = 5  # the runs directory keeps this many past runs' stores and logs


def new_run_dir(dev_dir: Path, name: str, *, prune: bool = True) -> Path:
    """A fresh directory under ``DIR/runs`` for one run; unless ``prune`` is off (a
    shard, whose siblings run beside it), the oldest beyond the last KEEP_RUNS are
    removed first, so the directory does not grow with every run."""
    runs = dev_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    past = sorted(
        (p for p in runs.iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime_ns, p.name)
    )
    for old in past[: max(0, len(past) - (KEEP_RUNS - 1))] if prune else ():
        shutil.rmtree(old, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = runs / f"{name}-{stamp}-{os.getpid()}"
    workdir.mkdir()
    return workdir


def outcome(doc: dict[str, Any], failures: int) -> int:
    """The exit code of a run, with its one line on stderr: NO_VERDICT when the fleet
    fell behind its schedule, its cloud could not send every command, or it did not
    drain and found nothing; 1 with ``failures`` violations, else 0."""
    late_by = (
        doc["schedule"]["late"]
        or report.unsent(doc)
        or (None if failures else report.undrained(doc))
    )
    if late_by:
        print(f"smartmi-sim: no verdict: {late_by}", file=sys.stderr)
        return NO_VERDICT
    if failures:
        counts = ", ".join(f"{n} {k}" for k, n in doc["violation_counts"].items() if n)
        print(
            f"smartmi-sim: {failures} privacy violations ({counts or 'in the capture'})",
            file=sys.stderr,
        )
        return 1
    return 0
