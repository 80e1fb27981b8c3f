"""One device's ledger: consent changes and sent messages (P11), sealed with the data key.

Tables::

    ledger  one row per entry, under an entry ID the store mints; the entry ID is
            bound into the entry's associated data

Entries are only appended; they leave with a wipe, or to quarantine when they fail
to open.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from agent.errors import TamperedRecord
from agent.store.database import Database
from agent.store.quarantine import Quarantine
from agent.store.sealing import Sealing


class Ledger:
    """One device's ledger entries, appended and read back in order."""

    def __init__(
        self, db: Database, device_id: str, sealing: Sealing, quarantine: Quarantine
    ) -> None:
        self.db = db
        self.device_id = device_id
        self.sealing = sealing
        self.quarantine = quarantine

    def append(self, entry: dict[str, Any]) -> None:
        """Seal and append one ledger entry under a fresh entry ID."""
        entry_id = uuid.uuid4().hex
        blob = self.sealing.data_vault().seal(
            json.dumps(entry, sort_keys=True).encode(), self.sealing.aad("ledger", entry_id)
        )
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO ledger (device_id, entry_id, blob) VALUES (?, ?, ?)",
                (self.device_id, entry_id, blob),
            )

    def entries(self) -> list[dict[str, Any]]:
        """Every readable ledger entry, oldest first; unreadable ones are quarantined."""
        if not self.sealing.has_data_key():
            self.quarantine.unreadable_without_key()
            return []
        rows = self.db.conn.execute(
            "SELECT seq, entry_id, blob FROM ledger WHERE device_id = ? ORDER BY seq",
            (self.device_id,),
        ).fetchall()
        out: list[dict[str, Any]] = []
        for seq, entry_id, blob in rows:
            try:
                plain = self.sealing.data_vault().open(
                    blob, self.sealing.aad("ledger", entry_id), table="ledger", row_id=entry_id
                )
            except TamperedRecord as exc:
                self.quarantine.move(
                    "ledger",
                    entry_id,
                    blob,
                    exc,
                    delete_sql="DELETE FROM ledger WHERE seq = ?",
                    delete_args=(seq,),
                )
                continue
            entry = json.loads(plain)
            entry.pop("id", None)  # entries sealed before the store minted the IDs carry one
            out.append(entry)
        return out
