"""One device's quarantine: its records that failed to open, kept for inspection.

Tables::

    quarantine  records that failed to open, kept for inspection, never sent

A record that fails its integrity check (edited, moved, truncated, rolled back, or
sealed with a key that is gone) is moved here in one transaction with its deletion
from its own table, and the problem is kept in ``Quarantine.problems``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from agent.errors import TamperedRecord
from agent.store.database import Database
from agent.store.sealing import Sealing

log = logging.getLogger("smartmi.store")


class Quarantine:
    """One device's quarantined records, and the problems found since opening."""

    def __init__(
        self, db: Database, device_id: str, sealing: Sealing, *, emptied: Callable[[], None]
    ) -> None:
        """``emptied`` runs once ``move_all`` has moved the device's data-key records."""
        self.db = db
        self.device_id = device_id
        self.sealing = sealing
        self._emptied = emptied
        self.problems: list[TamperedRecord] = []
        self.outbox_rows = 0  # outbox rows moved to quarantine since opening

    def _insert(
        self, c: sqlite3.Connection, source: str, row_ref: str, reason: str, blob: bytes | None
    ) -> None:
        c.execute(
            "INSERT INTO quarantine (device_id, source, row_ref, reason, blob) "
            "VALUES (?, ?, ?, ?, ?)",
            (self.device_id, source, row_ref, reason, blob),
        )

    def move(
        self,
        source: str,
        row_ref: str,
        blob: bytes | None,
        exc: TamperedRecord,
        *,
        delete_sql: str,
        delete_args: tuple[Any, ...],
    ) -> None:
        """Move one record of table ``source`` that failed to open to quarantine:
        ``delete_sql`` deletes it from its table in the same transaction."""
        with self.db.transaction() as c:
            self._insert(c, source, row_ref, exc.reason, blob)
            c.execute(delete_sql, delete_args)
        self.problems.append(exc)
        if source == "outbox":
            self.outbox_rows += 1
        log.error(
            "record failed its integrity check; moved to quarantine",
            extra={"device": self.device_id, "table": source, "reason": exc.reason},
        )

    def move_outbox_of_key(self, key_id: str, reason: str) -> int:
        """Move every outbox row sealed with item key ``key_id`` to quarantine, in one
        transaction (the key is gone: none of them can be opened); how many."""
        with self.db.transaction() as c:
            rows = c.execute(
                "DELETE FROM outbox WHERE device_id = ? AND key_id = ? RETURNING msg_id, blob",
                (self.device_id, key_id),
            ).fetchall()
            for msg_id, blob in rows:
                self._insert(c, "outbox", msg_id, reason, blob)
            self.outbox_rows += len(rows)

            def undo() -> None:
                self.outbox_rows -= len(rows)

            self.db.on_rollback(undo)
        self.problems.extend(TamperedRecord("outbox", msg_id, reason) for msg_id, _blob in rows)
        return len(rows)

    def unreadable_without_key(self) -> int:
        """Move this device's data-key records to quarantine if the key is gone."""
        if self.sealing.has_data_key():
            return 0
        return self.move_all("data key missing")

    def move_all(self, reason: str) -> int:
        """Move every data-key record of this device (outbox, ledger, state) to quarantine."""
        moved = 0
        with self.db.transaction() as c:
            tables = (("outbox", "msg_id"), ("ledger", "entry_id"), ("state", "device_id"))
            for table, ref in tables:
                rows = c.execute(
                    f"SELECT {ref}, blob FROM {table} WHERE device_id = ?",  # noqa: S608  # fixed names
                    (self.device_id,),
                ).fetchall()
                for row_ref, blob in rows:
                    self._insert(c, table, row_ref, reason, blob)
                    self.problems.append(TamperedRecord(table, row_ref, reason))
                moved += len(rows)
                if table == "outbox":
                    self.outbox_rows += len(rows)
                c.execute(f"DELETE FROM {table} WHERE device_id = ?", (self.device_id,))  # noqa: S608
        self._emptied()  # every row went: counted again on next use
        if moved:
            log.error(
                "records moved to quarantine",
                extra={"device": self.device_id, "reason": reason, "count": moved},
            )
        return moved

    def count(self) -> int:
        """How many of this device's records are in quarantine."""
        row = self.db.conn.execute(
            "SELECT count(*) FROM quarantine WHERE device_id = ?", (self.device_id,)
        ).fetchone()
        return int(row[0])
