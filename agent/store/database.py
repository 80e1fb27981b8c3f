"""One SQLite file in WAL mode, holding every device's tables (see ``records``).

One ``Database`` (one file, one connection) can hold many devices, keyed by device
ID: a Raspberry Pi has one, the simulator thousands, without one open file each.
Transactions nest, so callers can batch many writes into one commit.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, Literal

from agent.errors import StorageError
from agent.store import faults
from agent.store.fsutil import create_private_file

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    purpose TEXT NOT NULL,
    captured_ms INTEGER NOT NULL,
    blob BLOB NOT NULL,
    UNIQUE (device_id, msg_id)
);
CREATE INDEX IF NOT EXISTS outbox_by_purpose ON outbox (device_id, purpose, captured_ms);
CREATE TABLE IF NOT EXISTS item_keys (
    device_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    purpose TEXT NOT NULL,
    live INTEGER NOT NULL,
    reason TEXT,
    PRIMARY KEY (device_id, key_id)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    blob BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_device ON ledger (device_id, seq);
CREATE TABLE IF NOT EXISTS state (device_id TEXT PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS deletion_requests (
    device_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (device_id, msg_id)
);
CREATE TABLE IF NOT EXISTS deletion_journal (
    device_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (device_id, msg_id)
);
CREATE TABLE IF NOT EXISTS deletion_stand_ins (
    device_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, msg_id)
);
CREATE TABLE IF NOT EXISTS wipes (device_id TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS crash_files (
    device_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    PRIMARY KEY (device_id, msg_id)
);
CREATE TABLE IF NOT EXISTS control (device_id TEXT PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS device_meta (
    device_id TEXT PRIMARY KEY,
    wipe_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    source TEXT NOT NULL,
    row_ref TEXT NOT NULL,
    reason TEXT NOT NULL,
    blob BLOB
);
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store made by an earlier version up to this schema, in place.

    ``outbox.key_id`` names the item key that sealed a row; rows from before it have
    none and stay sealed with the data key.
    """
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "key_id" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN key_id TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox (device_id, key_id)")


Synchronous = Literal["FULL", "NORMAL", "OFF"]
RESERVE_BYTES: Final = 1 << 20


class Database:
    """One SQLite file in WAL mode; transactions nest, so callers can batch commits."""

    def __init__(
        self, path: Path, *, synchronous: Synchronous = "FULL", reserve: int = RESERVE_BYTES
    ) -> None:
        self.path = path
        self.reserve_path = path.with_name(f"{path.name}.reserve")
        self._reserve_bytes = reserve
        try:
            check = self._open(synchronous)
        except StorageError as exc:
            # Started on a full disk: the reserve makes room to open (SQLite needs its
            # -shm and -wal files); the device then runs with what it has.
            if exc.kind != faults.FULL or not self.release_reserve():
                raise
            check = self._open(synchronous)
        if check != "ok":
            raise StorageError(
                f"the state database {path} failed its integrity check ({check[:200]}); "
                f"{faults.HINTS[faults.CORRUPT]}",
                kind=faults.CORRUPT,
            )
        self._depth = 0
        self._after_commit: list[Callable[[], None]] = []
        self._undo: list[Callable[[], None]] = []
        self.ensure_reserve()

    def _open(self, synchronous: Synchronous) -> str:
        """Connect, set WAL mode, create the schema; the quick check's verdict."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
                if name == path.name or path.with_name(name).exists():
                    create_private_file(path.with_name(name))  # 0600 whatever the umask
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA busy_timeout = 5000")
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(f"{path}: cannot switch to WAL mode (got {mode})")
            # FULL: a committed transaction survives power loss (on a device);
            # NORMAL: survives a process crash (enough for simulated fleets).
            self.conn.execute(f"PRAGMA synchronous = {synchronous}")
            # Deleted content is overwritten with zeros inside the file (P9, belt and braces).
            self.conn.execute("PRAGMA secure_delete = ON")
            self.conn.executescript(_SCHEMA)
            _migrate(self.conn)
            return str(self.conn.execute("PRAGMA quick_check").fetchone()[0])
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self.conn.close()
            error = faults.mapped(exc, path)
            raise StorageError(
                f"the state database cannot be opened: {error}", kind=error.kind
            ) from exc

    # -- the reserve: space kept back so that a privacy-reducing write succeeds on a
    # full disk (a withdrawal, a wipe, a suspension must not fail for lack of space).
    def ensure_reserve(self) -> bool:
        """Allocate the reserve file if it is missing; False if there is no room."""
        if not self._reserve_bytes or self.reserve_path.exists():
            return True
        fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, self._reserve_bytes)
        except OSError:
            os.close(fd)
            self.reserve_path.unlink(missing_ok=True)
            return False
        os.close(fd)
        return True

    def release_reserve(self) -> bool:
        """Give the reserve's space back to the file system; False if there was none."""
        try:
            self.reserve_path.unlink()
        except OSError:  # none there, or it cannot go: either way nothing was freed
            return False
        return True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; a nested call is a savepoint inside the outermost one, so
        it is undone alone when it fails and the outer transaction goes on."""
        if self._depth:
            savepoint = f"sp{self._depth}"
            pending, undos = len(self._after_commit), len(self._undo)
            self._depth += 1
            try:
                self.conn.execute(f"SAVEPOINT {savepoint}")
                yield self.conn
                self.conn.execute(f"RELEASE {savepoint}")
            except BaseException as exc:
                del self._after_commit[pending:]
                self._run_undo(undos)
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute(f"ROLLBACK TO {savepoint}")
                    self.conn.execute(f"RELEASE {savepoint}")
                if isinstance(exc, sqlite3.Error | OSError):
                    raise faults.mapped(exc, self.path) from exc
                raise
            finally:
                self._depth -= 1
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise faults.mapped(exc, self.path) from exc
        self._depth = 1
        self._after_commit = []
        self._undo = []
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            self._run_undo(0)
            if self.conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error | OSError):
                raise faults.mapped(exc, self.path) from exc
            raise
        finally:
            self._depth = 0
            self._undo = []  # committed, or already undone
        done, self._after_commit = self._after_commit, []
        for action in done:
            action()

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` if the current transaction (or the savepoint it was registered
        in) rolls back: in-memory figures that follow a write are put back with it."""
        if self._depth:
            self._undo.append(undo)

    def _run_undo(self, keep: int) -> None:
        undo, self._undo = self._undo[keep:], self._undo[:keep]
        for action in reversed(undo):
            action()

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the current transaction has committed (at once outside
        one); it is forgotten if the transaction or its savepoint rolls back."""
        if self._depth:
            self._after_commit.append(action)
        else:
            action()

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file and truncate it."""
        if not self._depth:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise faults.mapped(exc, self.path) from exc

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
