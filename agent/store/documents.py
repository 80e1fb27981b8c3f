"""One device's one-row documents: its state (data key) and its control record (system key).

Tables::

    state    the device's settings and consent, data key
    control  not personal: suspension, commands taken, clock offset; system key,
             survives wipes

Each save carries the next generation, and a rollback counter kept apart from the
database (``KeyStore.counter``) follows it once committed: a document older than its
counter (a copy of the database put back) fails to open, as does an edited one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import TamperedRecord
from agent.store.family import TableFamily
from agent.store.vault import Vault

Table = Literal["state", "control"]


@dataclass(eq=False, repr=False)
class Documents(TableFamily):
    """One device's state and control records, sealed with their generations."""

    _generations: dict[str, int] = field(default_factory=dict, init=False)

    def _load(self, table: Table, vault: Vault) -> dict[str, Any] | None:
        """The device's row of ``table``, or None; TamperedRecord after quarantining it."""
        row = self.db.conn.execute(
            f"SELECT blob FROM {table} WHERE device_id = ?",  # noqa: S608  # fixed names
            (self.device_id,),
        ).fetchone()
        if row is None:
            return None
        try:
            value, generation = self._open(table, vault, row[0])
        except TamperedRecord as exc:
            self.quarantine.move(
                table,
                self.device_id,
                row[0],
                exc,
                delete_sql=f"DELETE FROM {table} WHERE device_id = ?",  # noqa: S608
                delete_args=(self.device_id,),
            )
            raise
        self._generations[table] = generation
        return value

    def _open(self, table: Table, vault: Vault, blob: bytes) -> tuple[dict[str, Any], int]:
        """A one-row record and its generation; TamperedRecord if it fails to open or is
        older than the counter kept apart from the database (a rollback)."""
        plain = vault.open(blob, self.sealing.aad(table), table=table, row_id=self.device_id)
        value: dict[str, Any] = json.loads(plain)
        generation = int(value.pop("_generation", 0))
        counter = self.keys.counter(f"{self.device_id}.{table}")
        if generation < counter:
            raise TamperedRecord(table, self.device_id, f"rolled back ({generation} < {counter})")
        return value, generation

    def _save(self, table: Table, vault: Vault, value: dict[str, Any]) -> None:
        # Each save carries the next generation; the counter kept apart from the
        # database follows once it is committed, so an older copy is found out on load.
        name = f"{self.device_id}.{table}"
        generation = max(self._generations.get(table, 0), self.keys.counter(name)) + 1
        sealed = {**value, "_generation": generation}
        blob = vault.seal(json.dumps(sealed, sort_keys=True).encode(), self.sealing.aad(table))
        with self.db.transaction() as c:
            c.execute(
                f"INSERT INTO {table} (device_id, blob) VALUES (?, ?) "  # noqa: S608  # fixed names
                "ON CONFLICT (device_id) DO UPDATE SET blob = excluded.blob",
                (self.device_id, blob),
            )
        self._generations[table] = generation
        self.db.after_commit(lambda: self.sealing.advance(name, generation))

    def load_state(self) -> dict[str, Any] | None:
        """The device's sealed state record, or None if there is none (or it was rejected)."""
        if not self.sealing.has_data_key():
            # Without the key the row (if any) can never open: quarantine it.
            self.quarantine.unreadable_without_key()
            return None
        try:
            return self._load("state", self.sealing.data_vault())
        except TamperedRecord:
            return None

    def save_state(self, value: dict[str, Any]) -> None:
        """Seal and store the device's state record."""
        self._save("state", self.sealing.data_vault(), value)

    def load_control(self) -> dict[str, Any] | None:
        """The control record (system key, survives wipes), or None if there is none;
        TamperedRecord (after moving it to quarantine) if it fails to open."""
        return self._load("control", self.sealing.system_vault())

    def save_control(self, value: dict[str, Any]) -> None:
        """Seal and store the control record."""
        self._save("control", self.sealing.system_vault(), value)
