"""Benchmarks: ``python -m bench`` runs them and prints a table (and writes JSON)."""

from __future__ import annotations

import argparse
import os
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
