"""What one device's records are sealed with: its keys as vaults, and the associated data.

A device has three keys besides the item keys of its outbox (``outbox``):

    data     outbox rows from before item keys, the ledger, the state; destroyed by a
             wipe, and never made again while a wipe is unfinished (P9)
    system   deletion requests and the control record; survives wipes
    journal  the journal copies of deletion requests; survives wipes

Plaintext columns are only what the store must index on (purpose, capture time,
msg_id), and each is bound into the record's associated data (``Sealing.aad``: the
table, the device ID, then the row's columns), so editing one makes the record fail
to open, as does a record copied onto another row or device.

The rollback counters kept apart from the database (``KeyStore.counter``) follow the
writes they count once those have committed (``Sealing.advance``).
"""

from __future__ import annotations

import logging

from agent.errors import StorageError
from agent.store.database import Database
from agent.store.keys import KeyStore
from agent.store.vault import Vault
from agent.store.wipes import refuse_while_unfinished

log = logging.getLogger("smartmi.store")


def ms(ts: float) -> int:
    """A time in seconds as the whole milliseconds the tables keep."""
    return round(ts * 1000)


class Sealing:
    """One device's data, system and journal vaults, each opened on first use."""

    def __init__(self, db: Database, device_id: str, keys: KeyStore) -> None:
        self.db = db
        self.device_id = device_id
        self.keys = keys
        self._data: Vault | None = None
        self._system: Vault | None = None
        self._journal: Vault | None = None

    @property
    def data_key_name(self) -> str:
        """The name of the device's data key in the key store."""
        return f"{self.device_id}.data"

    def data_vault(self) -> Vault:
        """The data key's vault; the key is made if there is none, unless a wipe is
        unfinished (StorageError then: nothing is sealed, so nothing captured now can
        outlive the wipe)."""
        if self._data is None:
            key = self.keys.load(self.data_key_name)
            if key is None:
                refuse_while_unfinished(self.db, self.device_id)
                key = self.keys.create(self.data_key_name)
            self._data = Vault(key)
        return self._data

    def forget_data(self) -> None:
        """Drop the data key's vault from memory; it is loaded again on next use."""
        self._data = None

    def system_vault(self) -> Vault:
        """The system key's vault, the key made first if there is none."""
        if self._system is None:
            self._system = Vault.open_or_create(self.keys, f"{self.device_id}.system")
        return self._system

    def journal_vault(self) -> Vault:
        """The journal key's vault, the key made first if there is none."""
        if self._journal is None:
            self._journal = Vault.open_or_create(self.keys, f"{self.device_id}.deletions")
        return self._journal

    def has_data_key(self) -> bool:
        """Whether a data key exists (it does not on a factory-new or wiped device)."""
        return self._data is not None or self.keys.load(self.data_key_name) is not None

    def aad(self, *parts: object) -> bytes:
        """The associated data of a record: its table, the device ID, then its columns."""
        return "\x00".join([str(parts[0]), self.device_id, *map(str, parts[1:])]).encode()

    def advance(self, name: str, value: int) -> None:
        """Raise the rollback counter ``name`` to ``value``; a failure is logged, not
        raised (the counter lags: a rollback to now goes unseen)."""
        try:
            self.keys.advance(name, value)
        except StorageError as exc:
            log.warning(
                "rollback counter not advanced",
                extra={"device": self.device_id, "counter": name, "kind": exc.kind},
            )
