"""The state directory's exclusive lock: one process at a time acts on a device's store."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from agent.errors import StoreLocked
from agent.store import faults
from agent.store.fsutil import require_private_dir


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold the state directory's lock, or raise StoreLocked at once.

    A state directory that other users can write to, or that another user owns, is
    refused (UnsafePermissions), as is one of its key directories.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        require_private_dir(state_dir, "the state directory")
        if (state_dir / "keys").exists():
            require_private_dir(state_dir / "keys", "the data key directory")
        fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise faults.mapped(exc, state_dir) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(
                f"another smartmi-agent process (usually the daemon) holds {state_dir}"
            ) from None
        yield
    finally:
        os.close(fd)
