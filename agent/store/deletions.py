"""One device's pending deletion requests (P10), kept so that none is ever lost.

Tables::

    deletion_requests  pending deletion requests, sealed with the system key, which
                       survives wipes
    deletion_journal   a second copy of each, sealed with a key of its own, to
                       re-create a lost request; counters kept apart from the database
                       (``KeyStore``) say how many were made and acknowledged
    deletion_stand_ins not personal: a request owed (by the counters) whose copies are
                       both lost, sent naming the device only (P10)
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.core import rules
from agent.core.purposes import Purpose
from agent.errors import StorageError, TamperedRecord
from agent.store.family import TableFamily
from agent.store.outbox import StoredItem
from agent.store.sealing import ms
from agent.store.vault import Vault

log = logging.getLogger("smartmi.store")

# A stand-in's msg_id, as ``Deletions._add_stand_ins`` makes it (a UUID's text).
_STAND_IN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(eq=False, repr=False)
class Deletions(TableFamily):
    """One device's deletion requests, their journal copies and their stand-ins."""

    recreated: int = field(
        default=0, init=False
    )  # requests re-created from their journal copies since opening
    lost: int = field(default=0, init=False)

    def _request_aad(self, msg_id: str, created_ms: int) -> bytes:
        return self.sealing.aad("deletion_requests", msg_id, created_ms)

    def _journal_aad(self, msg_id: str, created_ms: int) -> bytes:
        return self.sealing.aad("deletion_journal", msg_id, created_ms)

    def add(self, msg_id: str, created_at: float, payload: bytes) -> None:
        """Persist a pending deletion request, with its journal copy under another key."""
        cms = ms(created_at)
        copy = self.sealing.journal_vault().seal(payload, self._journal_aad(msg_id, cms))
        made = self._counter("made") + 1
        with self.db.transaction() as c:
            self._insert_request(msg_id, cms, payload)
            c.execute(
                "INSERT OR REPLACE INTO deletion_journal (device_id, msg_id, created_ms, blob) "
                "VALUES (?, ?, ?, ?)",
                (self.device_id, msg_id, cms, copy),
            )
        self.db.after_commit(lambda: self.sealing.advance(f"{self.device_id}.deletions-made", made))

    def _insert_request(self, msg_id: str, created_ms: int, payload: bytes) -> None:
        blob = self.sealing.system_vault().seal(payload, self._request_aad(msg_id, created_ms))
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO deletion_requests (device_id, msg_id, created_ms, blob) "
                "VALUES (?, ?, ?, ?)",
                (self.device_id, msg_id, created_ms, blob),
            )

    def _counter(self, which: str) -> int:
        return self.keys.counter(f"{self.device_id}.deletions-{which}")

    def pending(self, *, now: float | None = None) -> list[StoredItem]:
        """Pending deletion requests, oldest first (purpose field unused: activation).

        A request whose row is gone or fails to open is re-created from its journal
        copy, loudly. One gone from both (counted in ``lost``) is replaced, once and
        durably, by a stand-in naming the device only, made at ``now`` (not without
        it): the request is still sent (P10), without the binding that no key can tell
        any more.
        """
        sealing = self.sealing
        requests = self._open("deletion_requests", self._request_aad, sealing.system_vault)
        # Copies sealed before the journal had a key of its own are under the system key.
        journal = self._open(
            "deletion_journal", self._journal_aad, sealing.journal_vault, sealing.system_vault
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
                self._insert_request(copy.msg_id, ms(copy.captured_at), copy.payload)
            except StorageError as exc:  # the system key is unusable: the copy still goes
                log.error(  # noqa: TRY400  # an expected failure, no traceback
                    "deletion request not re-created; it is sent from its journal copy",
                    extra={"device": self.device_id, "msg_id": copy.msg_id, "error": str(exc)},
                )
            self.recreated += 1
            requests.append(copy)
        stand_ins = self._stand_ins()
        outstanding = self._counter("made") - self._counter("done")
        lost = max(0, outstanding - len(requests) - len(stand_ins))
        if lost and now is not None:
            log.error(
                "deletion requests lost with their journal copies; "
                "each is replaced by one naming the device only",
                extra={"device": self.device_id, "count": lost},
            )
            self._add_stand_ins(lost, now)
            stand_ins = self._stand_ins()
            self.lost += lost
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
                [(self.device_id, str(uuid.uuid4()), ms(now)) for _ in range(count)],
            )

    def _open(
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
                self.quarantine.move(
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

    def remove(self, msg_id: str) -> bool:
        """Forget an acknowledged deletion request, its journal copy or its stand-in."""
        done = self._counter("done") + 1
        removed = 0
        with self.db.transaction() as c:
            for table in ("deletion_requests", "deletion_journal", "deletion_stand_ins"):
                removed += c.execute(
                    f"DELETE FROM {table} WHERE device_id = ? AND msg_id = ?",  # noqa: S608
                    (self.device_id, msg_id),
                ).rowcount
        if removed:
            self.db.after_commit(
                lambda: self.sealing.advance(f"{self.device_id}.deletions-done", done)
            )
        return removed > 0


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
