"""One device's wipes (P9): the wipe in progress and how many there were.

Tables::

    wipes        a wipe in progress, finished on the next open after a crash
    device_meta  not personal: how many times the device was wiped

A wipe is two steps. ``begin`` records it, with its deletion request, in one
transaction; ``finish`` destroys the data key and the item keys first
(crypto-shredding), then deletes the rows. Until it is finished nothing is stored:
``refuse_while_unfinished`` is the check every new key goes through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import StorageError
from agent.store.database import Database

if TYPE_CHECKING:
    from agent.store.deletions import Deletions
    from agent.store.outbox import Outbox
    from agent.store.sealing import Sealing


def pending_wipe(db: Database, device_id: str) -> str | None:
    """The reason of the device's wipe that a crash interrupted, if any."""
    row = db.conn.execute("SELECT reason FROM wipes WHERE device_id = ?", (device_id,)).fetchone()
    return str(row[0]) if row else None


def refuse_while_unfinished(db: Database, device_id: str) -> None:
    """StorageError if a wipe of the device is not finished: nothing captured now may
    outlive the wipe (P9), whatever key would seal it."""
    if pending_wipe(db, device_id) is not None:
        raise StorageError(f"{db.path}: a wipe is not finished; nothing is stored until it is")


class Wipes:
    """One device's wipes: begun in one transaction, finished keys first."""

    def __init__(
        self,
        db: Database,
        device_id: str,
        sealing: Sealing,
        outbox: Outbox,
        deletions: Deletions,
    ) -> None:
        self.db = db
        self.device_id = device_id
        self.sealing = sealing
        self.outbox = outbox
        self.deletions = deletions

    def count(self) -> int:
        """How many times this device was wiped (not personal data)."""
        row = self.db.conn.execute(
            "SELECT wipe_count FROM device_meta WHERE device_id = ?", (self.device_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    def pending(self) -> str | None:
        """The reason of a wipe that a crash interrupted, if any."""
        return pending_wipe(self.db, self.device_id)

    def begin(self, reason: str, deletion_request: tuple[str, float, bytes] | None) -> None:
        """Step 1: record the wipe and its deletion request in one transaction."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO wipes (device_id, reason) VALUES (?, ?)",
                (self.device_id, reason),
            )
            c.execute(
                "INSERT INTO device_meta (device_id, wipe_count) VALUES (?, 1) "
                "ON CONFLICT (device_id) DO UPDATE SET wipe_count = wipe_count + 1",
                (self.device_id,),
            )
            if deletion_request is not None:
                self.deletions.add(*deletion_request)

    def finish(self) -> None:
        """Step 2: destroy the data key and the item keys first (crypto-shredding), then
        delete the rows. Idempotent, so a wipe cut short by a crash is finished on the
        next open."""
        self.sealing.forget_data()
        self.sealing.keys.destroy(self.sealing.data_key_name)
        self.outbox.destroy_item_keys()
        with self.db.transaction() as c:
            for table in ("outbox", "ledger", "state", "quarantine", "wipes", "item_keys"):
                c.execute(f"DELETE FROM {table} WHERE device_id = ?", (self.device_id,))  # noqa: S608
        self.outbox.forget_item_keys()
        self.db.checkpoint()
