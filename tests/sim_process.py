"""``smartmi-sim`` as a child process, stopped by a signal once it printed a line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def interrupted_run(
    args: list[str],
    *,
    after: bytes,
    sig: signal.Signals,
    within_s: float,
    before_signal: Callable[[int], object] = lambda pid: None,
) -> tuple[int, bytes, bytes]:
    """Run ``python -m simulator.cli ARGS``; once its stderr shows ``after``, call
    ``before_signal(pid)``, send ``sig``, and return (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "simulator.cli", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        assert proc.stdout is not None
        deadline = time.monotonic() + within_s
        line = b""
        while after not in line:
            line = proc.stderr.readline()
            assert line, f"the run ended before it printed {after!r}"
            assert time.monotonic() < deadline
        before_signal(proc.pid)
        proc.send_signal(sig)
        err = proc.stderr.read()
        out = proc.stdout.read()
        return proc.wait(within_s), out, err


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (the workers, the broker)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # it ended while we looked
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, pp in parents.items() if pp == parent}
        found |= children
        todo.extend(children)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left
