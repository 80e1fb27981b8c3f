"""What every table family of one device's store works with: the database, the
device's ID, its key store, its vaults, and the quarantine for what cannot be read.
``Documents``, ``Outbox`` and ``Deletions`` each add their own state to it."""

from __future__ import annotations

from dataclasses import dataclass

from agent.store.database import Database
from agent.store.keys import KeyStore
from agent.store.quarantine import Quarantine
from agent.store.sealing import Sealing


@dataclass(eq=False, repr=False)
class TableFamily:
    """The shared pieces, owned by the store (``records.DeviceStore``)."""

    db: Database
    device_id: str
    keys: KeyStore
    sealing: Sealing
    quarantine: Quarantine
