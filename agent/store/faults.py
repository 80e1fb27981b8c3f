"""Storage faults mapped at the storage edge into ``StorageError`` with a kind.

Every public method of the store's classes runs under ``edge``: an ``sqlite3`` or
``OSError`` leaving the store becomes a ``StorageError`` whose ``kind`` says what
went wrong (full, read-only, corrupt, io), so the layers above decide on the kind
and never see a library exception.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from agent.errors import AgentError, StorageError

FULL: Final = "full"
READ_ONLY: Final = "read-only"
CORRUPT: Final = "corrupt"
IO: Final = "io"
OTHER: Final = "other"
LOW_SPACE_BYTES: Final = 64 * 1024  # below this an I/O error counts as a full disk

# SQLite's primary result codes (https://www.sqlite.org/rescode.html).
_SQLITE_KINDS: Final = {
    13: FULL,  # SQLITE_FULL
    8: READ_ONLY,  # SQLITE_READONLY
    23: READ_ONLY,  # SQLITE_AUTH
    14: READ_ONLY,  # SQLITE_CANTOPEN: usually a directory it may not write
    3: READ_ONLY,  # SQLITE_PERM
    11: CORRUPT,  # SQLITE_CORRUPT
    26: CORRUPT,  # SQLITE_NOTADB
    10: IO,  # SQLITE_IOERR
}
_SQLITE_TEXTS: Final = (
    ("disk is full", FULL),
    ("readonly", READ_ONLY),
    ("malformed", CORRUPT),
    ("not a database", CORRUPT),
)
_ERRNO_KINDS: Final = {
    errno.ENOSPC: FULL,
    errno.EDQUOT: FULL,
    errno.EFBIG: FULL,
    errno.EROFS: READ_ONLY,
    errno.EACCES: READ_ONLY,
    errno.EPERM: READ_ONLY,
    errno.EIO: IO,
}
HINTS: Final = {
    FULL: "free space on that file system; nothing stored is lost meanwhile",
    READ_ONLY: "make the state directory writable by the agent's user",
    CORRUPT: "keep the file for recovery; the agent sends nothing personal meanwhile",
    IO: "the storage device failed a read or write; check it",
    OTHER: "",
}


def kind_of(exc: BaseException) -> str:
    """The StorageError kind of a library error."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int):
            return _SQLITE_KINDS.get(code & 0xFF, OTHER)
        text = str(exc).lower()
        return next((kind for needle, kind in _SQLITE_TEXTS if needle in text), OTHER)
    if isinstance(exc, OSError):
        return _ERRNO_KINDS.get(exc.errno or 0, IO)
    return OTHER


def mapped(exc: sqlite3.Error | OSError, where: object) -> StorageError:
    """``exc`` as a StorageError naming ``where``, its kind and what to do."""
    kind = kind_of(exc)
    if kind == IO and isinstance(where, Path) and _out_of_space(where):
        kind = FULL  # SQLite reports a -shm or -wal it cannot grow as an I/O error
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    hint = HINTS[kind]
    return StorageError(f"{where}: {detail} ({kind}){'; ' + hint if hint else ''}", kind=kind)


def _out_of_space(path: Path) -> bool:
    directory = path if path.is_dir() else path.parent
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


P = ParamSpec("P")
R = TypeVar("R")


def edge(where: Callable[..., object]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Map library errors escaping the decorated method; ``where(self)`` names the store."""

    def wrap(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except AgentError:
                raise
            except (sqlite3.Error, OSError) as exc:
                raise mapped(exc, where(args[0])) from exc

        return inner

    return wrap


def guard_public_methods(where: Callable[..., object]) -> Callable[[type[R]], type[R]]:
    """Class decorator: ``edge`` on every public method defined by the class."""

    def decorate(cls: type[R]) -> type[R]:
        for name, value in list(vars(cls).items()):
            if inspect.isfunction(value) and not name.startswith("_"):
                setattr(cls, name, edge(where)(value))
        return cls

    return decorate
