"""One device's records in the shared database, every one sealed by a vault (P8).

``DeviceStore`` is one device's view of a ``Database``: a facade over the modules that
hold each family of tables, which it makes and shares the database, the key store and
the device ID with. Plaintext columns are only what the store must index on (purpose,
capture time, msg_id), and each is bound into the record's associated data, so editing
one makes the record fail to open.

Tables, by the module that holds them::

    sealing     (no table) the data, system and journal keys; associated data
    documents   state (data key), control (system key, survives wipes)
    outbox      outbox, item_keys: queued items (P2, P7) and their per-purpose keys
    ledger      ledger: consent changes and sent messages (P11), data key
    deletions   deletion_requests, deletion_journal, deletion_stand_ins (P10)
    wipes       wipes, device_meta: a wipe in progress, and how many there were (P9)
    quarantine  quarantine: records that failed to open, kept, never sent
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.core.purposes import Purpose
from agent.errors import TamperedRecord
from agent.store.database import Database
from agent.store.deletions import Deletions
from agent.store.documents import Documents
from agent.store.faults import guard_public_methods
from agent.store.keys import KeyStore
from agent.store.ledger import Ledger
from agent.store.outbox import Outbox, StoredItem
from agent.store.quarantine import Quarantine
from agent.store.sealing import Sealing
from agent.store.wipes import Wipes

__all__ = ["DeviceStore", "StoredItem"]


@guard_public_methods(lambda store: store.db.path)
class DeviceStore:
    """One device's records in a Database; library errors leave as StorageError."""

    def __init__(self, db: Database, device_id: str, keys: KeyStore) -> None:
        self.db = db
        self.device_id = device_id
        self.keys = keys
        self._sealing = Sealing(db, device_id, keys)
        # The outbox, made below, counts its rows again once the quarantine has taken them all.
        self._quarantine = Quarantine(
            db,
            device_id,
            self._sealing,
            emptied=lambda: self._outbox.recount(),  # noqa: PLW0108
        )
        self._documents = Documents(db, device_id, keys, self._sealing, self._quarantine)
        self._outbox = Outbox(db, device_id, keys, self._sealing, self._quarantine)
        self._ledger = Ledger(db, device_id, self._sealing, self._quarantine)
        self._deletions = Deletions(db, device_id, keys, self._sealing, self._quarantine)
        self._wipes = Wipes(db, device_id, self._sealing, self._outbox, self._deletions)

    @property
    def problems(self) -> list[TamperedRecord]:
        """The records found unreadable since opening (each moved to quarantine)."""
        return self._quarantine.problems

    @property
    def quarantined_outbox(self) -> int:
        """How many outbox rows were moved to quarantine since opening."""
        return self._quarantine.outbox_rows

    @property
    def deletions_recreated(self) -> int:
        """How many deletion requests were re-created from their journal copies."""
        return self._deletions.recreated

    @property
    def deletions_lost(self) -> int:
        """How many deletion requests, lost with their copies, stand-ins replaced."""
        return self._deletions.lost

    # -- keys and quarantine -----------------------------------------------
    def has_data_key(self) -> bool:
        """Whether a data key exists (it does not on a factory-new or wiped device)."""
        return self._sealing.has_data_key()

    def unreadable_without_key(self) -> int:
        """Move this device's data-key records to quarantine if the key is gone."""
        return self._quarantine.unreadable_without_key()

    def quarantine_all(self, reason: str) -> int:
        """Move every data-key record of this device (outbox, ledger, state) to quarantine."""
        return self._quarantine.move_all(reason)

    def quarantined(self) -> int:
        """How many of this device's records are in quarantine."""
        return self._quarantine.count()

    # -- one-row records: state (data key) and control (system key) -------
    def load_state(self) -> dict[str, Any] | None:
        """The device's sealed state record, or None if there is none (or it was rejected)."""
        return self._documents.load_state()

    def save_state(self, value: dict[str, Any]) -> None:
        """Seal and store the device's state record."""
        self._documents.save_state(value)

    def load_control(self) -> dict[str, Any] | None:
        """The control record (system key, survives wipes), or None if there is none;
        TamperedRecord (after moving it to quarantine) if it fails to open."""
        return self._documents.load_control()

    def save_control(self, value: dict[str, Any]) -> None:
        """Seal and store the control record."""
        self._documents.save_control(value)

    # -- outbox and item keys ----------------------------------------------
    def enqueue(self, msg_id: str, purpose: Purpose, captured_at: float, payload: bytes) -> None:
        """Persist a queued item, sealed with its purpose's live item key."""
        self._outbox.enqueue(msg_id, purpose, captured_at, payload)

    def count(self) -> int:
        """How many items are queued (rows of shredded keys are not)."""
        return self._outbox.count()

    def shred_purpose(self, purpose: Purpose, reason: str) -> tuple[int, list[str]]:
        """Make every queued item of ``purpose`` unreadable at once (P2); see
        ``Outbox.shred_purpose``. Returns how many items the key sealed, and the
        deleted msg_ids of rows from before item keys."""
        return self._outbox.shred_purpose(purpose, reason)

    def reap(self, limit: int = 512) -> int:
        """Delete up to ``limit`` rows of shredded keys; how many went."""
        return self._outbox.reap(limit)

    def shredded_pending(self) -> bool:
        """Whether rows of shredded keys wait for the reaper."""
        return self._outbox.shredded_pending()

    def take_reaped(self) -> dict[str, list[str]]:
        """The msg_ids of shredded rows deleted since the last call, by reason."""
        return self._outbox.take_reaped()

    def msg_ids(self) -> list[str]:
        """The msg_ids of every queued item, without opening the records."""
        return self._outbox.msg_ids()

    def queued(self, limit: int, exclude: frozenset[str] = frozenset()) -> list[StoredItem]:
        """Up to ``limit`` queued items, oldest first; records that fail to open are
        quarantined."""
        return self._outbox.queued(limit, exclude)

    def rewrite(
        self, purpose: Purpose, change: Callable[[bytes], bytes], *, before: float | None = None
    ) -> int:
        """Re-seal every queued item of ``purpose`` (or only those captured before
        ``before``) with ``change(payload)``; how many."""
        return self._outbox.rewrite(purpose, change, before=before)

    def purge_older_than(self, purpose: Purpose, cutoff: float) -> list[str]:
        """Delete items of ``purpose`` captured before ``cutoff`` (P7 retention)."""
        return self._outbox.purge_older_than(purpose, cutoff)

    def purge_oldest(self, n: int) -> list[str]:
        """Delete the ``n`` oldest items (P7 cap)."""
        return self._outbox.purge_oldest(n)

    def delete_items(self, msg_ids: list[str]) -> list[str]:
        """Delete the named items; return the ones that were there."""
        return self._outbox.delete_items(msg_ids)

    def acknowledge(self, msg_id: str, ledger_entry: dict[str, Any]) -> bool:
        """Remove an acknowledged item and ledger it, atomically (no resurrection).

        Returns whether the row was still there (a withdrawal may have purged it
        while it was in flight; it left the device, so it is ledgered all the same).
        """
        with self.db.transaction():
            gone = self._outbox.delete_items([msg_id])
            self.append_ledger(ledger_entry)
        return bool(gone)

    # -- ledger ------------------------------------------------------------
    def append_ledger(self, entry: dict[str, Any]) -> None:
        """Seal and append one ledger entry under a fresh entry ID."""
        self._ledger.append(entry)

    def ledger(self) -> list[dict[str, Any]]:
        """Every readable ledger entry, oldest first; unreadable ones are quarantined."""
        return self._ledger.entries()

    # -- deletion requests (system key, survive wipes) ---------------------
    def add_deletion_request(self, msg_id: str, created_at: float, payload: bytes) -> None:
        """Persist a pending deletion request, with its journal copy under another key."""
        self._deletions.add(msg_id, created_at, payload)

    def deletion_requests(self, *, now: float | None = None) -> list[StoredItem]:
        """Pending deletion requests, oldest first; see ``Deletions.pending`` for how a
        lost one is re-created or replaced by a stand-in made at ``now``."""
        return self._deletions.pending(now=now)

    def remove_deletion_request(self, msg_id: str) -> bool:
        """Forget an acknowledged deletion request, its journal copy or its stand-in."""
        return self._deletions.remove(msg_id)

    # -- wipe (P9) ---------------------------------------------------------
    def wipe_count(self) -> int:
        """How many times this device was wiped (not personal data)."""
        return self._wipes.count()

    def pending_wipe(self) -> str | None:
        """The reason of a wipe that a crash interrupted, if any."""
        return self._wipes.pending()

    def begin_wipe(self, reason: str, deletion_request: tuple[str, float, bytes] | None) -> None:
        """Step 1: record the wipe and its deletion request in one transaction."""
        self._wipes.begin(reason, deletion_request)

    def finish_wipe(self) -> None:
        """Step 2: destroy the data key first (crypto-shredding), then delete the rows.

        Idempotent, so a wipe cut short by a crash is finished on the next open.
        """
        self._wipes.finish()
