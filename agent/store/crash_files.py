"""Which claimed crash files were captured: one crash file, one item, across any kill.

The collector renames a crash file to a name with the item's ``msg_id`` before it
captures it, and deletes it after. The capture and a row here commit in one
transaction, so a file still there after a kill says, by its name, whether it was
captured (the row is there: delete the file) or not (capture it, with that
``msg_id``). The rows hold nothing personal: a random ``msg_id`` each, until the file
is gone.
"""

from __future__ import annotations

import sqlite3

from agent.store import faults
from agent.store.database import Database


class CrashFiles:
    """One device's captured-crash-file notes in the shared database."""

    def __init__(self, db: Database, device_id: str) -> None:
        self.db = db
        self.device_id = device_id

    def note(self, msg_id: str) -> None:
        """The file claimed as ``msg_id`` is captured (inside the capture's transaction)."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO crash_files (device_id, msg_id) VALUES (?, ?)",
                (self.device_id, msg_id),
            )

    def captured(self, msg_id: str) -> bool:
        """Whether the file claimed as ``msg_id`` was captured."""
        try:
            row = self.db.conn.execute(
                "SELECT 1 FROM crash_files WHERE device_id = ? AND msg_id = ?",
                (self.device_id, msg_id),
            ).fetchone()
        except sqlite3.Error as exc:
            raise faults.mapped(exc, self.db.path) from exc
        return row is not None

    def forget(self, msg_id: str) -> None:
        """The file is gone: its note is no longer needed."""
        with self.db.transaction() as c:
            c.execute(
                "DELETE FROM crash_files WHERE device_id = ? AND msg_id = ?",
                (self.device_id, msg_id),
            )
