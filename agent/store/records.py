"""One device's records in the shared database, every one sealed by a vault (P8).

``DeviceStore`` is one device's view of a ``Database``. Plaintext columns are only what the store
must index on (purpose, capture time, msg_id), and each is bound into the record's
associated data, so editing one makes the record fail to open.

Tables::

    outbox             queued items (P2, P7), each sealed with its purpose's item key
                       (rows from before item keys: the data key)
    item_keys          one item key per purpose and grant: live, or shredded (its key
                       destroyed, its rows unreadable) and waiting for the reaper
    ledger             consent changes and sent messages (P11), data key
    state              the device's settings and consent, data key
    deletion_requests  pending deletion requests (P10), sealed with the system key,
                       which survives wipes
    deletion_journal   a second copy of each, sealed with a key of its own, to
                       re-create a lost request; counters kept apart from the database
                       (``KeyStore``) say how many were made and acknowledged
    deletion_stand_ins not personal: a request owed (by the counters) whose copies are
                       both lost, sent naming the device only (P10)
    wipes              a wipe in progress, finished on the next open after a crash
    control            not personal: suspension, commands taken, clock offset; system
                       key, survives wipes
    device_meta        not personal: how many times the device was wiped
    quarantine         records that failed to open, kept for inspection, never sent

Past 400 lines on purpose: each table's seal and open sit side by side, so the
associated-data scheme that binds a record to its row is visible in one place.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agent.core import rules
from agent.core.purposes import Purpose
from agent.errors import StorageError, TamperedRecord
from agent.store.database import Database
from agent.store.faults import guard_public_methods
from agent.store.keys import KeyStore
from agent.store.vault import Vault

log = logging.getLogger("smartmi.store")


# An outbox row that is a queued item: sealed with the data key (from before item keys)
# or with a live item key. Takes the device ID once more.
_LIVE = (
    "(key_id IS NULL OR key_id IN (SELECT key_id FROM item_keys WHERE device_id = ? AND live = 1))"
)


def _ms(ts: float) -> int:
    return round(ts * 1000)


# A stand-in's msg_id, as ``_add_stand_ins`` makes it (a UUID's text).
_STAND_IN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class StoredItem:
    """A queued outbox item as read back from the store."""

    seq: int
    msg_id: str
    purpose: Purpose
    captured_at: float
    payload: bytes


@guard_public_methods(lambda store: store.db.path)
class DeviceStore:
    """One device's records in a Database; library errors leave as StorageError."""

    def __init__(self, db: Database, device_id: str, keys: KeyStore) -> None:
        self.db = db
        self.device_id = device_id
        self.keys = keys
        self._data: Vault | None = None
        self._system: Vault | None = None
        self._journal: Vault | None = None
        self.problems: list[TamperedRecord] = []
        self.quarantined_outbox = 0  # outbox rows moved to quarantine since opening
        self._generations: dict[str, int] = {}
        self.deletions_recreated = 0
        self.deletions_lost = 0
        # Item keys, read on first use: the live one of each purpose, the shredded ones
        # not yet reaped (with why), and how many outbox rows each key sealed (None: the
        # data key), so that a shredding knows what it destroyed without reading rows.
        self._keys_loaded = False
        self._live: dict[Purpose, str] = {}
        self._dead: dict[str, str] = {}
        self._rows: dict[str | None, int] = {}
        self._item_vaults: dict[str, Vault] = {}
        # Shredded rows deleted since the device last asked (``take_reaped``), by reason.
        self._reaped: dict[str, list[str]] = {}

    # -- keys --------------------------------------------------------------
    @property
    def _data_key_name(self) -> str:
        return f"{self.device_id}.data"

    def _data_vault(self) -> Vault:
        if self._data is None:
            key = self.keys.load(self._data_key_name)
            if key is None:
                if self.pending_wipe() is not None:
                    # Never a new key while a wipe is unfinished: nothing is sealed, so
                    # nothing captured now can outlive the wipe (P9).
                    raise StorageError(
                        f"{self.db.path}: a wipe is not finished; nothing is stored until it is"
                    )
                key = self.keys.create(self._data_key_name)
            self._data = Vault(key)
        return self._data

    def _system_vault(self) -> Vault:
        if self._system is None:
            self._system = Vault.open_or_create(self.keys, f"{self.device_id}.system")
        return self._system

    def _journal_vault(self) -> Vault:
        if self._journal is None:
            self._journal = Vault.open_or_create(self.keys, f"{self.device_id}.deletions")
        return self._journal

    def has_data_key(self) -> bool:
        """Whether a data key exists (it does not on a factory-new or wiped device)."""
        return self._data is not None or self.keys.load(self._data_key_name) is not None

    def _aad(self, *parts: object) -> bytes:
        return "\x00".join([str(parts[0]), self.device_id, *map(str, parts[1:])]).encode()

    def _quarantine(
        self,
        source: str,
        row_ref: str,
        blob: bytes | None,
        exc: TamperedRecord,
        *,
        delete_sql: str,
        delete_args: tuple[Any, ...],
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO quarantine (device_id, source, row_ref, reason, blob) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.device_id, source, row_ref, exc.reason, blob),
            )
            c.execute(delete_sql, delete_args)
        self.problems.append(exc)
        if source == "outbox":
            self.quarantined_outbox += 1
        log.error(
            "record failed its integrity check; moved to quarantine",
            extra={"device": self.device_id, "table": source, "reason": exc.reason},
        )

    def unreadable_without_key(self) -> int:
        """Move this device's data-key records to quarantine if the key is gone."""
        if self.has_data_key():
            return 0
        return self.quarantine_all("data key missing")

    def quarantine_all(self, reason: str) -> int:
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
                    c.execute(
                        "INSERT INTO quarantine (device_id, source, row_ref, reason, blob) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (self.device_id, table, row_ref, reason, blob),
                    )
                    self.problems.append(TamperedRecord(table, row_ref, reason))
                moved += len(rows)
                if table == "outbox":
                    self.quarantined_outbox += len(rows)
                c.execute(f"DELETE FROM {table} WHERE device_id = ?", (self.device_id,))  # noqa: S608
        self._keys_loaded = False  # every row went: count again on next use
        if moved:
            log.error(
                "records moved to quarantine",
                extra={"device": self.device_id, "reason": reason, "count": moved},
            )
        return moved

    # -- one-row records: state (data key) and control (system key) -------
    def _load_one(self, table: Literal["state", "control"], vault: Vault) -> dict[str, Any] | None:
        """The device's row of ``table``, or None; TamperedRecord after quarantining it."""
        row = self.db.conn.execute(
            f"SELECT blob FROM {table} WHERE device_id = ?",  # noqa: S608  # fixed names
            (self.device_id,),
        ).fetchone()
        if row is None:
            return None
        try:
            value, generation = self._open_one(table, vault, row[0])
        except TamperedRecord as exc:
            self._quarantine(
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

    def _open_one(
        self, table: Literal["state", "control"], vault: Vault, blob: bytes
    ) -> tuple[dict[str, Any], int]:
        """A one-row record and its generation; TamperedRecord if it fails to open or is
        older than the counter kept apart from the database (a rollback)."""
        plain = vault.open(blob, self._aad(table), table=table, row_id=self.device_id)
        value: dict[str, Any] = json.loads(plain)
        generation = int(value.pop("_generation", 0))
        counter = self.keys.counter(f"{self.device_id}.{table}")
        if generation < counter:
            raise TamperedRecord(table, self.device_id, f"rolled back ({generation} < {counter})")
        return value, generation

    def _advance(self, name: str, value: int) -> None:
        try:
            self.keys.advance(name, value)
        except StorageError as exc:  # the counter lags: a rollback to now goes unseen
            log.warning(
                "rollback counter not advanced",
                extra={"device": self.device_id, "counter": name, "kind": exc.kind},
            )

    def _save_one(
        self, table: Literal["state", "control"], vault: Vault, value: dict[str, Any]
    ) -> None:
        # Each save carries the next generation; the counter kept apart from the
        # database follows once it is committed, so an older copy is found out on load.
        name = f"{self.device_id}.{table}"
        generation = max(self._generations.get(table, 0), self.keys.counter(name)) + 1
        sealed = {**value, "_generation": generation}
        blob = vault.seal(json.dumps(sealed, sort_keys=True).encode(), self._aad(table))
        with self.db.transaction() as c:
            c.execute(
                f"INSERT INTO {table} (device_id, blob) VALUES (?, ?) "  # noqa: S608  # fixed names
                "ON CONFLICT (device_id) DO UPDATE SET blob = excluded.blob",
                (self.device_id, blob),
            )
        self._generations[table] = generation
        self.db.after_commit(lambda: self._advance(name, generation))

    def load_state(self) -> dict[str, Any] | None:
        """The device's sealed state record, or None if there is none (or it was rejected)."""
        if not self.has_data_key():
            # Without the key the row (if any) can never open: quarantine it.
            self.unreadable_without_key()
            return None
        try:
            return self._load_one("state", self._data_vault())
        except TamperedRecord:
            return None

    def save_state(self, value: dict[str, Any]) -> None:
        """Seal and store the device's state record."""
        self._save_one("state", self._data_vault(), value)

    def load_control(self) -> dict[str, Any] | None:
        """The control record (system key, survives wipes), or None if there is none;
        TamperedRecord (after moving it to quarantine) if it fails to open."""
        return self._load_one("control", self._system_vault())

    def save_control(self, value: dict[str, Any]) -> None:
        """Seal and store the control record."""
        self._save_one("control", self._system_vault(), value)

    # -- outbox ------------------------------------------------------------
    def _item_aad(self, msg_id: str, purpose: str, captured_ms: int) -> bytes:
        return self._aad("outbox", msg_id, purpose, captured_ms)

    def enqueue(self, msg_id: str, purpose: Purpose, captured_at: float, payload: bytes) -> None:
        """Persist a queued item, sealed with its purpose's live item key."""
        cms = _ms(captured_at)
        with self.db.transaction() as c:
            key_id, vault = self._live_item_key(purpose)
            blob = vault.seal(payload, self._item_aad(msg_id, purpose.value, cms))
            c.execute(
                "INSERT INTO outbox (device_id, msg_id, purpose, captured_ms, blob, key_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (self.device_id, msg_id, purpose.value, cms, blob, key_id),
            )
            self._count_rows(key_id, +1)

    def count(self) -> int:
        """How many items are queued (rows of shredded keys are not)."""
        self._load_keys()
        return sum(n for key_id, n in self._rows.items() if key_id not in self._dead)

    # -- item keys: P2 in one small durable write ------------------------
    def _item_key_name(self, key_id: str) -> str:
        return f"{self.device_id}.item.{key_id}"

    def _load_keys(self) -> None:
        if self._keys_loaded:
            return
        self._live, self._dead = {}, {}
        conn = self.db.conn
        for key_id, purpose, live, reason in conn.execute(
            "SELECT key_id, purpose, live, reason FROM item_keys WHERE device_id = ?",
            (self.device_id,),
        ):
            if live:
                self._live[Purpose(purpose)] = key_id
            else:
                self._dead[key_id] = reason
        self._rows = dict(
            conn.execute(
                "SELECT key_id, count(*) FROM outbox WHERE device_id = ? GROUP BY key_id",
                (self.device_id,),
            )
        )
        self._keys_loaded = True

    def _count_rows(self, key_id: str | None, delta: int) -> None:
        self._rows[key_id] = self._rows.get(key_id, 0) + delta
        self.db.on_rollback(lambda: self._count_rows(key_id, -delta))

    def _live_item_key(self, purpose: Purpose) -> tuple[str, Vault]:
        """The purpose's live item key, made (row first, then key file) if there is none.

        Called inside the enqueue's transaction: if that rolls back, so does the row,
        and the key file it made seals nothing.
        """
        self._load_keys()
        if self.pending_wipe() is not None:
            # Nothing captured now may outlive the wipe (P9), whatever key would seal it.
            raise StorageError(
                f"{self.db.path}: a wipe is not finished; nothing is stored until it is"
            )
        key_id = self._live.get(purpose)
        if key_id is None:
            key_id = uuid.uuid4().hex[:16]
            self.db.conn.execute(
                "INSERT INTO item_keys (device_id, key_id, purpose, live) VALUES (?, ?, ?, 1)",
                (self.device_id, key_id, purpose.value),
            )
            self._live[purpose] = key_id

            def undo() -> None:
                self._live.pop(purpose, None)

            self.db.on_rollback(undo)
            self._item_vaults[key_id] = Vault(self.keys.create(self._item_key_name(key_id)))
        vault = self._item_vault(key_id)
        if vault is None:  # the key file is gone (tampering, or a restored card)
            raise StorageError(
                f"item key {self._item_key_name(key_id)} is missing; withdraw and grant the "
                "purpose again, or reset the device",
                kind="corrupt",
            )
        return key_id, vault

    def _item_vault(self, key_id: str | None) -> Vault | None:
        """The vault that opens rows sealed with ``key_id`` (None: the data key)."""
        if key_id is None:
            return self._data_vault()
        vault = self._item_vaults.get(key_id)
        if vault is None:
            key = self.keys.load(self._item_key_name(key_id))
            if key is None:
                return None
            vault = self._item_vaults[key_id] = Vault(key)
        return vault

    def shred_purpose(self, purpose: Purpose, reason: str) -> tuple[int, list[str]]:
        """Make every queued item of ``purpose`` unreadable at once (P2): its item key is
        marked shredded in this transaction and destroyed when it commits, whatever the
        number of items; the reaper deletes the rows later. Rows from before item keys
        are deleted now. Returns how many items the key sealed, and the deleted msg_ids.

        If the process dies before the key file is destroyed, the key is shredded on
        the next reap (the mark is durable), and no row of it is ever opened again.
        """
        self._load_keys()
        with self.db.transaction() as c:
            legacy = (
                self._delete_returning("key_id IS NULL AND purpose = ?", (purpose.value,))
                if self._rows.get(None, 0) > 0  # rows from before item keys (counted at open)
                else []
            )
            key_id = self._live.get(purpose)
            if key_id is None:
                return 0, legacy
            c.execute(
                "UPDATE item_keys SET live = 0, reason = ? WHERE device_id = ? AND key_id = ?",
                (reason, self.device_id, key_id),
            )
            del self._live[purpose]
            self._dead[key_id] = reason

            def undo() -> None:
                self._live[purpose] = key_id
                self._dead.pop(key_id, None)

            self.db.on_rollback(undo)
            self.db.after_commit(lambda: self._destroy_item_key(key_id))
        return self._rows.get(key_id, 0), legacy

    def _destroy_item_key(self, key_id: str) -> None:
        self._item_vaults.pop(key_id, None)
        try:
            self.keys.destroy(self._item_key_name(key_id))
        except StorageError as exc:  # the mark is durable: the next reap tries again
            log.error(  # noqa: TRY400  # the kind says it
                "item key not destroyed yet",
                extra={"device": self.device_id, "key": key_id, "kind": exc.kind},
            )

    def reap(self, limit: int = 512) -> int:
        """Delete up to ``limit`` rows of shredded keys (their keys destroyed first, again
        if need be); the msg_ids wait in ``take_reaped``. Returns how many rows went."""
        self._load_keys()
        done = 0
        for key_id, reason in list(self._dead.items()):
            self._destroy_item_key(key_id)
            room = limit - done
            with self.db.transaction() as c:
                gone = [
                    r[0]
                    for r in c.execute(
                        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE "
                        "device_id = ? AND key_id = ? LIMIT ?) RETURNING msg_id",
                        (self.device_id, key_id, room),
                    )
                ]
                self._count_rows(key_id, -len(gone))
                # The mark goes only once the table has no row of the key left (fewer
                # than asked for came back), whatever the count in memory says: a row
                # without its mark would be neither queued nor reaped.
                if len(gone) < room:
                    c.execute(
                        "DELETE FROM item_keys WHERE device_id = ? AND key_id = ?",
                        (self.device_id, key_id),
                    )
                    self.db.after_commit(functools.partial(self._forget, key_id))
            self._reaped.setdefault(reason, []).extend(gone)
            done += len(gone)
            if done >= limit:
                break
        return done

    def _forget(self, key_id: str) -> None:
        self._dead.pop(key_id, None)
        self._rows.pop(key_id, None)

    def shredded_pending(self) -> bool:
        """Whether rows of shredded keys wait for the reaper."""
        self._load_keys()
        return bool(self._dead)

    def take_reaped(self) -> dict[str, list[str]]:
        """The msg_ids of shredded rows deleted since the last call, by reason."""
        reaped, self._reaped = self._reaped, {}
        return reaped

    def msg_ids(self) -> list[str]:
        """The msg_ids of every queued item, without opening the records (rows of
        shredded keys are not queued)."""
        rows = self.db.conn.execute(
            f"SELECT msg_id FROM outbox WHERE device_id = ? AND {_LIVE} ORDER BY seq",  # noqa: S608
            (self.device_id, self.device_id),
        ).fetchall()
        return [r[0] for r in rows]

    def queued(self, limit: int, exclude: frozenset[str] = frozenset()) -> list[StoredItem]:
        """Up to ``limit`` queued items, oldest first; records that fail to open are
        quarantined. Rows of shredded keys are not queued items: they are never read."""
        rows = self.db.conn.execute(
            "SELECT seq, msg_id, purpose, captured_ms, blob, key_id FROM outbox "  # noqa: S608
            f"WHERE device_id = ? AND {_LIVE} ORDER BY seq LIMIT ?",
            (self.device_id, self.device_id, limit + len(exclude)),
        ).fetchall()
        out: list[StoredItem] = []
        for seq, msg_id, purpose, cms, blob, key_id in rows:
            if msg_id in exclude:
                continue
            payload = self._open_item(seq, msg_id, purpose, cms, blob, key_id=key_id)
            if payload is None:
                continue
            out.append(StoredItem(seq, msg_id, Purpose(purpose), cms / 1000, payload))
            if len(out) >= limit:
                break
        return out

    def _open_item(
        self, seq: int, msg_id: str, purpose: str, cms: int, blob: bytes, *, key_id: str | None
    ) -> bytes | None:
        """An outbox row's payload, or None after moving a row that fails to open to
        quarantine. The purpose column is bound into the AAD: an edited one fails here,
        as does a row whose item key is missing."""
        vault = self._item_vault(key_id)
        if vault is None:
            problem = TamperedRecord("outbox", msg_id, "its item key is missing")
        else:
            try:
                return vault.open(
                    blob, self._item_aad(msg_id, purpose, cms), table="outbox", row_id=msg_id
                )
            except TamperedRecord as exc:
                problem = exc
        self._count_rows(key_id, -1)
        self._quarantine(
            "outbox",
            msg_id,
            blob,
            problem,
            delete_sql="DELETE FROM outbox WHERE seq = ?",
            delete_args=(seq,),
        )
        return None

    def rewrite(
        self, purpose: Purpose, change: Callable[[bytes], bytes], *, before: float | None = None
    ) -> int:
        """Re-seal every queued item of ``purpose`` (or only those captured before
        ``before``) with ``change(payload)``, under the key that sealed it; how many.
        Rows of shredded keys are gone already."""
        cutoff = _ms(before) if before is not None else None
        rows = self.db.conn.execute(
            "SELECT seq, msg_id, captured_ms, blob, key_id FROM outbox WHERE device_id = ? "  # noqa: S608
            f"AND purpose = ? AND {_LIVE} AND (? IS NULL OR captured_ms < ?)",
            (self.device_id, purpose.value, self.device_id, cutoff, cutoff),
        ).fetchall()
        with self.db.transaction() as c:
            for seq, msg_id, cms, blob, key_id in rows:
                payload = self._open_item(seq, msg_id, purpose.value, cms, blob, key_id=key_id)
                vault = self._item_vault(key_id)
                if payload is None or vault is None:
                    continue
                aad = self._item_aad(msg_id, purpose.value, cms)
                c.execute(
                    "UPDATE outbox SET blob = ? WHERE seq = ?",
                    (vault.seal(change(payload), aad), seq),
                )
        return len(rows)

    def _delete_returning(self, where: str, args: tuple[Any, ...]) -> list[str]:
        """Delete rows; the msg_ids of the queued ones. Rows of shredded keys that go
        too are told apart (``take_reaped``): they were accounted for when shredded."""
        self._load_keys()
        with self.db.transaction() as c:
            rows = c.execute(
                f"DELETE FROM outbox WHERE device_id = ? AND {where} RETURNING msg_id, key_id",  # noqa: S608
                (self.device_id, *args),
            ).fetchall()
            out: list[str] = []
            for msg_id, key_id in rows:
                self._count_rows(key_id, -1)
                reason = self._dead.get(key_id) if key_id is not None else None
                if reason is None:
                    out.append(msg_id)
                else:
                    self._reaped.setdefault(reason, []).append(msg_id)
        return out

    def purge_older_than(self, purpose: Purpose, cutoff: float) -> list[str]:
        """Delete items of ``purpose`` captured before ``cutoff`` (P7 retention)."""
        return self._delete_returning(
            "purpose = ? AND captured_ms < ?", (purpose.value, _ms(cutoff))
        )

    def purge_oldest(self, n: int) -> list[str]:
        """Delete the ``n`` oldest items (P7 cap)."""
        return self._delete_returning(
            f"seq IN (SELECT seq FROM outbox WHERE device_id = ? AND {_LIVE} ORDER BY seq LIMIT ?)",  # noqa: S608
            (self.device_id, self.device_id, n),
        )

    def delete_items(self, msg_ids: list[str]) -> list[str]:
        """Delete the named items; return the ones that were there."""
        out: list[str] = []
        for msg_id in msg_ids:
            out += self._delete_returning("msg_id = ?", (msg_id,))
        return out

    def acknowledge(self, msg_id: str, ledger_entry: dict[str, Any]) -> bool:
        """Remove an acknowledged item and ledger it, atomically (no resurrection).

        Returns whether the row was still there (a withdrawal may have purged it
        while it was in flight; it left the device, so it is ledgered all the same).
        """
        with self.db.transaction():
            gone = self._delete_returning("msg_id = ?", (msg_id,))
            self.append_ledger(ledger_entry)
        return bool(gone)

    # -- ledger ------------------------------------------------------------
    def append_ledger(self, entry: dict[str, Any]) -> None:
        """Seal and append one ledger entry under a fresh entry ID."""
        entry_id = uuid.uuid4().hex
        blob = self._data_vault().seal(
            json.dumps(entry, sort_keys=True).encode(), self._aad("ledger", entry_id)
        )
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO ledger (device_id, entry_id, blob) VALUES (?, ?, ?)",
                (self.device_id, entry_id, blob),
            )

    def ledger(self) -> list[dict[str, Any]]:
        """Every readable ledger entry, oldest first; unreadable ones are quarantined."""
        if not self.has_data_key():
            self.unreadable_without_key()
            return []
        rows = self.db.conn.execute(
            "SELECT seq, entry_id, blob FROM ledger WHERE device_id = ? ORDER BY seq",
            (self.device_id,),
        ).fetchall()
        out: list[dict[str, Any]] = []
        for seq, entry_id, blob in rows:
            try:
                plain = self._data_vault().open(
                    blob, self._aad("ledger", entry_id), table="ledger", row_id=entry_id
                )
            except TamperedRecord as exc:
                self._quarantine(
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

    # -- deletion requests (system key, survive wipes) ---------------------
    def _dr_aad(self, msg_id: str, created_ms: int) -> bytes:
        return self._aad("deletion_requests", msg_id, created_ms)

    def _journal_aad(self, msg_id: str, created_ms: int) -> bytes:
        return self._aad("deletion_journal", msg_id, created_ms)

    def add_deletion_request(self, msg_id: str, created_at: float, payload: bytes) -> None:
        """Persist a pending deletion request, with its journal copy under another key."""
        cms = _ms(created_at)
        copy = self._journal_vault().seal(payload, self._journal_aad(msg_id, cms))
        made = self._deletion_counter("made") + 1
        with self.db.transaction() as c:
            self._insert_request(msg_id, cms, payload)
            c.execute(
                "INSERT OR REPLACE INTO deletion_journal (device_id, msg_id, created_ms, blob) "
                "VALUES (?, ?, ?, ?)",
                (self.device_id, msg_id, cms, copy),
            )
        self.db.after_commit(lambda: self._advance(f"{self.device_id}.deletions-made", made))

    def _insert_request(self, msg_id: str, created_ms: int, payload: bytes) -> None:
        blob = self._system_vault().seal(payload, self._dr_aad(msg_id, created_ms))
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO deletion_requests (device_id, msg_id, created_ms, blob) "
                "VALUES (?, ?, ?, ?)",
                (self.device_id, msg_id, created_ms, blob),
            )

    def _deletion_counter(self, which: str) -> int:
        return self.keys.counter(f"{self.device_id}.deletions-{which}")

    def deletion_requests(self, *, now: float | None = None) -> list[StoredItem]:
        """Pending deletion requests, oldest first (purpose field unused: activation).

        A request whose row is gone or fails to open is re-created from its journal
        copy, loudly. One gone from both (counted in ``deletions_lost``) is replaced,
        once and durably, by a stand-in naming the device only, made at ``now`` (not
        without it): the request is still sent (P10), without the binding that no key
        can tell any more.
        """
        requests = self._open_deletions("deletion_requests", self._dr_aad, self._system_vault)
        # Copies sealed before the journal had a key of its own are under the system key.
        journal = self._open_deletions(
            "deletion_journal", self._journal_aad, self._journal_vault, self._system_vault
        )
        present = {r.msg_id for r in requests}
        for copy in journal:
            if copy.msg_id in present:
                continue
            log.error(
                "deletion request lost; re-created from its journal copy",
                extra={"device": self.device_id, "msg_id": copy.msg_id},
            )
            try:
                self._insert_request(copy.msg_id, _ms(copy.captured_at), copy.payload)
            except StorageError as exc:  # the system key is unusable: the copy still goes
                log.error(  # noqa: TRY400  # an expected failure, no traceback
                    "deletion request not re-created; it is sent from its journal copy",
                    extra={"device": self.device_id, "msg_id": copy.msg_id, "error": str(exc)},
                )
            self.deletions_recreated += 1
            requests.append(copy)
        stand_ins = self._stand_ins()
        outstanding = self._deletion_counter("made") - self._deletion_counter("done")
        lost = max(0, outstanding - len(requests) - len(stand_ins))
        if lost and now is not None:
            log.error(
                "deletion requests lost with their journal copies; "
                "each is replaced by one naming the device only",
                extra={"device": self.device_id, "count": lost},
            )
            self._add_stand_ins(lost, now)
            stand_ins = self._stand_ins()
            self.deletions_lost += lost
        requests += stand_ins
        requests.sort(key=lambda r: (r.captured_at, r.seq))
        return requests

    def _stand_ins(self) -> list[StoredItem]:
        """The stand-ins; a row that makes no valid request (edited by hand, damaged)
        is deleted, loudly, and the request it stood for is counted lost again, so a
        fresh stand-in replaces it."""
        rows = self.db.conn.execute(
            "SELECT rowid, msg_id, created_ms FROM deletion_stand_ins WHERE device_id = ?",
            (self.device_id,),
        ).fetchall()
        out = []
        for rowid, msg_id, cms in rows:
            try:
                item = _stand_in(self.device_id, rowid, msg_id, cms)
            except (TypeError, ValueError, OverflowError) as exc:  # SchemaError is one
                log.error(  # noqa: TRY400  # the row is named, no traceback
                    "a deletion stand-in makes no valid request; it is replaced",
                    extra={"device": self.device_id, "row": rowid, "error": str(exc)[:200]},
                )
                with self.db.transaction() as c:
                    c.execute("DELETE FROM deletion_stand_ins WHERE rowid = ?", (rowid,))
                continue
            out.append(item)
        return out

    def _add_stand_ins(self, count: int, now: float) -> None:
        with self.db.transaction() as c:
            c.executemany(
                "INSERT INTO deletion_stand_ins (device_id, msg_id, created_ms) VALUES (?, ?, ?)",
                [(self.device_id, str(uuid.uuid4()), _ms(now)) for _ in range(count)],
            )

    def _open_deletions(
        self,
        table: Literal["deletion_requests", "deletion_journal"],
        aad: Callable[[str, int], bytes],
        *keys: Callable[[], Vault],
    ) -> list[StoredItem]:
        """The rows of ``table`` that one of ``keys`` opens; a row none opens goes to
        quarantine. A key that cannot be loaded is left out, loudly, and its rows left
        in place (only a stand-in replaces what it sealed)."""
        rows = self.db.conn.execute(
            f"SELECT rowid, msg_id, created_ms, blob FROM {table} WHERE device_id = ? "  # noqa: S608
            "ORDER BY created_ms, rowid",
            (self.device_id,),
        ).fetchall()
        vaults = self._usable(keys, table) if rows else []
        if not vaults:
            return []
        out: list[StoredItem] = []
        for rowid, msg_id, cms, blob in rows:
            try:
                payload = _open_with(vaults, blob, aad(msg_id, cms), table=table, row_id=msg_id)
            except TamperedRecord as exc:
                self._quarantine(
                    table,
                    msg_id,
                    blob,
                    exc,
                    delete_sql=f"DELETE FROM {table} WHERE rowid = ?",  # noqa: S608
                    delete_args=(rowid,),
                )
                continue
            out.append(StoredItem(rowid, msg_id, Purpose.ACTIVATION, cms / 1000, payload))
        return out

    def _usable(self, keys: tuple[Callable[[], Vault], ...], table: str) -> list[Vault]:
        usable = []
        for key in keys:
            try:
                usable.append(key())
            except StorageError as exc:
                log.error(  # noqa: TRY400  # the error names the key file
                    "a key of the deletion requests cannot be used; its rows are left unread",
                    extra={"device": self.device_id, "table": table, "error": str(exc)},
                )
        return usable

    def remove_deletion_request(self, msg_id: str) -> bool:
        """Forget an acknowledged deletion request, its journal copy or its stand-in."""
        done = self._deletion_counter("done") + 1
        removed = 0
        with self.db.transaction() as c:
            for table in ("deletion_requests", "deletion_journal", "deletion_stand_ins"):
                removed += c.execute(
                    f"DELETE FROM {table} WHERE device_id = ? AND msg_id = ?",  # noqa: S608
                    (self.device_id, msg_id),
                ).rowcount
        if removed:
            self.db.after_commit(lambda: self._advance(f"{self.device_id}.deletions-done", done))
        return removed > 0

    # -- wipe (P9) ---------------------------------------------------------
    def wipe_count(self) -> int:
        """How many times this device was wiped (not personal data)."""
        row = self.db.conn.execute(
            "SELECT wipe_count FROM device_meta WHERE device_id = ?", (self.device_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    def pending_wipe(self) -> str | None:
        """The reason of a wipe that a crash interrupted, if any."""
        row = self.db.conn.execute(
            "SELECT reason FROM wipes WHERE device_id = ?", (self.device_id,)
        ).fetchone()
        return str(row[0]) if row else None

    def begin_wipe(self, reason: str, deletion_request: tuple[str, float, bytes] | None) -> None:
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
                self.add_deletion_request(*deletion_request)

    def finish_wipe(self) -> None:
        """Step 2: destroy the data key first (crypto-shredding), then delete the rows.

        Idempotent, so a wipe cut short by a crash is finished on the next open.
        """
        self._data = None
        self.keys.destroy(self._data_key_name)
        item_keys = [
            r[0]
            for r in self.db.conn.execute(
                "SELECT key_id FROM item_keys WHERE device_id = ?", (self.device_id,)
            )
        ]
        for key_id in item_keys:
            self.keys.destroy(self._item_key_name(key_id))
        with self.db.transaction() as c:
            for table in ("outbox", "ledger", "state", "quarantine", "wipes", "item_keys"):
                c.execute(f"DELETE FROM {table} WHERE device_id = ?", (self.device_id,))  # noqa: S608
        self._keys_loaded = False
        self._live, self._dead, self._rows, self._item_vaults = {}, {}, {}, {}
        self._reaped = {}
        self.db.checkpoint()

    def quarantined(self) -> int:
        """How many of this device's records are in quarantine."""
        row = self.db.conn.execute(
            "SELECT count(*) FROM quarantine WHERE device_id = ?", (self.device_id,)
        ).fetchone()
        return int(row[0])


def _open_with(vaults: list[Vault], blob: bytes, aad: bytes, *, table: str, row_id: str) -> bytes:
    """``blob`` opened by the first of ``vaults`` that can; TamperedRecord if none can."""
    for vault in vaults[:-1]:
        try:
            return vault.open(blob, aad, table=table, row_id=row_id)
        except TamperedRecord:
            continue
    return vaults[-1].open(blob, aad, table=table, row_id=row_id)


def _stand_in(device_id: str, rowid: int, msg_id: object, created_ms: object) -> StoredItem:
    """The request a stand-in row makes; ValueError or TypeError if it makes none."""
    if not isinstance(msg_id, str) or not _STAND_IN_ID.fullmatch(msg_id):
        raise ValueError(f"msg_id {str(msg_id)[:80]!r} is not one a stand-in gets")
    at = float(created_ms) / 1000  # type: ignore[arg-type]  # checked by the caller's except
    payload = rules.deletion_request(device_id, msg_id, now=at, binding_id=None, reason="unknown")
    return StoredItem(rowid, msg_id, Purpose.ACTIVATION, at, payload)
