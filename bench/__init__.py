"""Benchmarks: ``python -m bench`` runs them and prints a table (and writes JSON)."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a clear error, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def cpu_seconds(stat: Path) -> float:
    """User plus system CPU seconds from a ``/proc/PID/stat`` or ``/proc/PID/task/TID/stat``
    file (``utime`` and ``stime``, proc(5))."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Progress:
    """One line on stderr when a step starts and every ``every`` seconds while it runs:
    what is running, for how long, and the whole run's time so far."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._t0 = time.monotonic()
        self._step = ""
        self._step_t0 = self._t0
        self._changed = threading.Event()
        self._ticker: threading.Thread | None = None

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self._t0

    def step(self, what: str) -> None:
        """``what`` is running now."""
        self._step, self._step_t0 = what, time.monotonic()
        self._say()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()
        self._changed.set()

    def _say(self) -> None:
        now = time.monotonic()
        print(
            f"[{_clock(now - self._t0)}] {self._step} ({_clock(now - self._step_t0)})",
            file=sys.stderr,
            flush=True,
        )

    def _tick(self) -> None:
        while True:
            if not self._changed.wait(self.every):
                self._say()
            self._changed.clear()


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}:{s:02d}"


progress = Progress()  # the run's, shared by the modules that run steps
