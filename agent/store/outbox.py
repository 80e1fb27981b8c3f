"""One device's outbox: queued items (P2, P7) and the item keys that seal them.

Tables::

    outbox     queued items, each sealed with its purpose's item key (rows from before
               item keys: the data key); the purpose, capture time and msg_id are
               bound into each item's associated data
    item_keys  one item key per purpose and grant: live, or shredded (its key
               destroyed, its rows unreadable) and waiting for the reaper

Withdrawing a purpose (P2) is one small durable write whatever its number of items:
its item key is marked shredded and destroyed; the reaper deletes the rows later.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.core.purposes import Purpose
from agent.errors import StorageError, TamperedRecord
from agent.store.family import TableFamily
from agent.store.sealing import ms
from agent.store.vault import Vault
from agent.store.wipes import refuse_while_unfinished

log = logging.getLogger("smartmi.store")

# An outbox row that is a queued item: sealed with the data key (from before item keys)
# or with a live item key. Takes the device ID once more.
_LIVE = (
    "(key_id IS NULL OR key_id IN (SELECT key_id FROM item_keys WHERE device_id = ? AND live = 1))"
)


@dataclass(frozen=True, slots=True)
class StoredItem:
    """A queued outbox item as read back from the store."""

    seq: int
    msg_id: str
    purpose: Purpose
    captured_at: float
    payload: bytes


@dataclass(eq=False, repr=False)
class Outbox(TableFamily):
    """One device's queued items and item keys, with counts of rows per key."""

    # Item keys, read on first use: the live one of each purpose, the shredded ones
    # not yet reaped (with why), and how many outbox rows each key sealed (None: the
    # data key), so that a shredding knows what it destroyed without reading rows.
    _keys_loaded: bool = field(default=False, init=False)
    _live: dict[Purpose, str] = field(default_factory=dict, init=False)
    _dead: dict[str, str] = field(default_factory=dict, init=False)
    _rows: dict[str | None, int] = field(default_factory=dict, init=False)
    _item_vaults: dict[str, Vault] = field(default_factory=dict, init=False)
    # Shredded rows deleted since the device last asked (``take_reaped``), by reason.
    _reaped: dict[str, list[str]] = field(default_factory=dict, init=False)

    def _item_aad(self, msg_id: str, purpose: str, captured_ms: int) -> bytes:
        return self.sealing.aad("outbox", msg_id, purpose, captured_ms)

    def enqueue(self, msg_id: str, purpose: Purpose, captured_at: float, payload: bytes) -> None:
        """Persist a queued item, sealed with its purpose's live item key."""
        cms = ms(captured_at)
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
        refuse_while_unfinished(self.db, self.device_id)
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
        if vault is None:  # the key file is gone (tampering, or a store restored from a copy)
            self._retire_lost_key(purpose, key_id)
            return self._live_item_key(purpose)
        return key_id, vault

    def _retire_lost_key(self, purpose: Purpose, key_id: str) -> None:
        """``purpose``'s live item key is gone: none of its rows can be opened, so they go
        to quarantine (never sent, no longer queued) and the key is forgotten, in the
        caller's transaction; the caller then makes a new key. Found on a store restored
        from a copy made before a withdrawal destroyed the key, or on tampering."""
        moved = self.quarantine.move_outbox_of_key(key_id, "its item key is missing")
        self.db.conn.execute(
            "DELETE FROM item_keys WHERE device_id = ? AND key_id = ?", (self.device_id, key_id)
        )
        rows = self._rows.pop(key_id, 0)
        del self._live[purpose]

        def undo() -> None:
            self._live[purpose] = key_id
            self._rows[key_id] = rows

        self.db.on_rollback(undo)
        log.error(
            "item key missing: its items moved to quarantine, a new key made",
            extra={
                "device": self.device_id,
                "key": self._item_key_name(key_id),
                "purpose": purpose.value,
                "count": moved,
            },
        )

    def _item_vault(self, key_id: str | None) -> Vault | None:
        """The vault that opens rows sealed with ``key_id`` (None: the data key)."""
        if key_id is None:
            return self.sealing.data_vault()
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
        self.quarantine.move(
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
        cutoff = ms(before) if before is not None else None
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
            "purpose = ? AND captured_ms < ?", (purpose.value, ms(cutoff))
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

    def recount(self) -> None:
        """Read the item keys and the rows per key again on next use."""
        self._keys_loaded = False

    def destroy_item_keys(self) -> None:
        """Destroy the key file of every item key of the device, live or shredded."""
        for (key_id,) in self.db.conn.execute(
            "SELECT key_id FROM item_keys WHERE device_id = ?", (self.device_id,)
        ).fetchall():
            self.keys.destroy(self._item_key_name(key_id))

    def forget_item_keys(self) -> None:
        """Forget every item key and count held in memory (their rows are gone)."""
        self._keys_loaded = False
        self._live, self._dead, self._rows, self._item_vaults = {}, {}, {}, {}
        self._reaped = {}
