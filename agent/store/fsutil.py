"""Small filesystem helpers with the durability and permissions the agent needs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_private(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Atomically write ``data`` to ``path`` readable by the owner only.

    With ``durable`` (the default) the file and its directory entry are fsynced;
    bulk tooling that can regenerate its output may skip that.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or an old file widened it
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
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
