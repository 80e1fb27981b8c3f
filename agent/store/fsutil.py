"""Small filesystem helpers with the durability and permissions the agent needs."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agent.errors import UnsafePermissions


def write_private(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Atomically write ``data`` to ``path`` readable by the owner only.

    With ``durable`` (the default) the file and its directory entry are fsynced;
    bulk tooling that can regenerate its output may skip that.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed or an old file widened it
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write", str(tmp))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never a half-written file left behind
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shred_file(path: Path) -> None:
    """Overwrite a small secret file with zeros, fsync, then unlink it.

    Flash wear-levelling may keep old blocks, which is why the vault relies on
    crypto-shredding (P9); the overwrite is a second line of defence.
    """
    with contextlib.suppress(FileNotFoundError):
        size = path.stat().st_size
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        fsync_dir(path.parent)


def require_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that its owner does not alone control (as AWS IoT Device
    Client does): any group or other permission bit, or another (non-root) owner."""
    _require(path, what, 0o077, "open to", 0o600)


def require_private_dir(path: Path, what: str) -> None:
    """Refuse a directory that others can write to (they could swap its files), or that
    another (non-root) user owns."""
    _require(path, what, 0o022, "writable by", 0o700)


def _require(path: Path, what: str, forbidden: int, verb: str, fix: int) -> None:
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbidden:
        raise UnsafePermissions(
            path, f"({what}) has mode {mode:04o}, {verb} other users", f"chmod {fix:o} {path}"
        )
    _require_owner(path, st, what)


def _require_owner(path: Path, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if me != 0 and st.st_uid not in (me, 0):  # root may act on the service user's files
        raise UnsafePermissions(
            path,
            f"({what}) belongs to uid {st.st_uid}, not to this user (uid {me})",
            f"chown {me} {path}, or run as its owner",
        )


def create_private_file(path: Path) -> None:
    """Create ``path`` 0600 if it does not exist, and narrow it to 0600 if it does
    (SQLite gives its -wal and -shm files the main file's mode).

    An existing file is changed by path, never opened: closing a descriptor drops
    every POSIX lock this process holds on the file, including SQLite's own locks of
    another connection, which would let a second process reset a live -shm file.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)
        return
    os.close(fd)
