"""A guard that outlives a broker's owner: whatever kills the simulator, even SIGKILL, its
broker process and its runtime directory (with the broker's private key) go too.

``Guard`` starts a small process of its own that holds the read end of a pipe. The
owner tells it, a line each, the process group of every broker process it starts
(``watch``) and of every one it stopped (``unwatch``). When the pipe ends, because the
owner closed it (``close``) or because the owner died and the kernel closed it, the
guard kills the groups still running and removes the directory. The guard runs in a
session of its own, so a Ctrl-C in the terminal reaches the owner, whose cleanup comes
first.

Run as ``python -m simulator.guard DIR``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


class Guard:
    """The owner's side: a pipe to a guard process for one runtime directory."""

    def __init__(self, directory: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "simulator.guard", str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _say(self, line: str) -> None:
        pipe = self._proc.stdin
        if pipe is None or pipe.closed:
            return
        with contextlib.suppress(BrokenPipeError):
            pipe.write(f"{line}\n".encode())
            pipe.flush()

    def watch(self, pgid: int) -> None:
        """A broker process runs as process group ``pgid``: kill it if the owner dies."""
        self._say(f"+{pgid}")

    def unwatch(self, pgid: int) -> None:
        """The owner stopped process group ``pgid``."""
        self._say(f"-{pgid}")

    def close(self) -> None:
        """The owner is done: the guard removes the directory (if still there) and ends."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def main(directory: str) -> int:
    """Wait for the owner's pipe to end; then kill the groups still running and remove
    ``directory``."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the pipe's end ends the guard
    running: set[int] = set()
    for line in sys.stdin:
        with contextlib.suppress(ValueError):
            pgid = int(line)
            if pgid > 0:
                running.add(pgid)
            else:
                running.discard(-pgid)
    for pgid in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
