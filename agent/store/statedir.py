"""The state directory's exclusive lock: one process at a time acts on a device's store."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from agent.errors import StoreLocked, UnsafePermissions
from agent.store import faults
from agent.store.fsutil import require_private_dir

LOCK_POLL_S = 0.05  # how often a held lock is tried again while waiting for it


@contextlib.contextmanager
def locked(state_dir: Path, *, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the state directory's lock, waiting up to ``wait_s`` for another process to
    let it go (a CLI verb holds it for a moment), or raise StoreLocked.

    A state directory that other users can write to, or that another user owns, is
    refused (UnsafePermissions), as is one of its key directories.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        require_usable(state_dir)
        fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise faults.mapped(exc, state_dir) from exc
    try:
        _lock(fd, state_dir, wait_s)
        yield
    finally:
        os.close(fd)


def _lock(fd: int, state_dir: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
                raise StoreLocked(
                    f"another smartmi-agent process (usually the daemon) holds {state_dir}" + waited
                ) from None
            time.sleep(LOCK_POLL_S)
        else:
            return


def require_usable(state_dir: Path) -> None:
    """UnsafePermissions, naming the fix, unless this user alone controls the state
    directory and its key directory, and every file in them is this user's."""
    require_private_dir(state_dir, "the state directory")
    if (state_dir / "keys").exists():
        require_private_dir(state_dir / "keys", "the data key directory")
    _require_own_files(state_dir)


def _require_own_files(state_dir: Path) -> None:
    """Refuse, with the fix, a state directory holding files another user made.

    Root may act on the service user's files, but not the other way round: a file
    root left (a verb run as root by an older version, or files copied in as root)
    would fail later with a bare permission error, so it is named here.
    """
    me = os.geteuid()
    if me == 0:
        return
    for directory in (state_dir, state_dir / "keys"):
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            st = entry.lstat()
            if st.st_uid != me:
                raise UnsafePermissions(
                    entry,
                    f"belongs to uid {st.st_uid}, not to this user (uid {me}), so this user "
                    "cannot use it",
                    f"chown -R {me}:{os.getegid()} {state_dir}, or run as uid {st.st_uid}",
                )


@contextlib.contextmanager
def as_owner_of(state_dir: Path) -> Iterator[None]:
    """Act as the owner of ``state_dir`` while root works on it directly.

    The state directory of a service belongs to its user; a verb that root runs
    when no daemon answers would otherwise leave files the service cannot open.
    Root switches its effective user and group to the directory's owner for the
    duration, so every file it makes belongs to that user, and switches back.
    """
    try:
        st = state_dir.stat()
    except OSError:
        st = None
    if os.geteuid() != 0 or st is None or st.st_uid == 0:
        yield
        return
    os.setegid(st.st_gid)
    try:
        os.seteuid(st.st_uid)
    except OSError:
        os.setegid(0)
        raise
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
