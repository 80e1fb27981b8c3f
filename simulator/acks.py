"""Acknowledgements from a whole simulated fleet, written in one transaction per loop turn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.errors import AgentError
from agent.runtime.transport import Transport
from agent.store.database import Database

log = logging.getLogger("smartmi.sim.acks")


class AckBatch:
    """Acknowledgements from many transports over one store, recorded in one transaction.

    The simulator's devices share one SQLite file; PUBACKs that arrive in the same
    event-loop iteration are written together instead of one commit each. An item is
    only removed from the outbox inside that transaction, so a crash before it leaves
    the item queued and it is sent again (at-least-once, same msg_id). ``add`` is a
    transport's ``ack_sink``.

    A PUBACK for an item the device no longer knows (a wipe forgot what was in flight,
    possibly between the PUBACK and this batch) changes nothing on the device, but the
    broker did take the item: ``forgotten`` hears of it, so the ground truth keeps that
    evidence of when it left.
    """

    def __init__(
        self, db: Database, forgotten: Callable[[Transport, str, float], None] | None = None
    ) -> None:
        self.db = db
        self.forgotten = forgotten
        self._pending: list[tuple[Transport, str, float]] = []

    def add(self, transport: Transport, msg_id: str, now: float) -> None:
        """Queue one acknowledgement; the batch is written on the next loop iteration."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append((transport, msg_id, now))

    def flush(self) -> None:
        """Write every queued acknowledgement in one transaction, each in a savepoint."""
        batch, self._pending = self._pending, []
        with self.db.transaction() as conn:
            for transport, msg_id, now in batch:
                conn.execute("SAVEPOINT ack")
                try:
                    known = transport.device.acknowledged(msg_id, now=now)
                except AgentError as exc:
                    # Only this one is undone: it stays queued and is sent again.
                    conn.execute("ROLLBACK TO ack")
                    log.error("cannot record acknowledgement", extra={"error": str(exc)})  # noqa: TRY400  # an expected failure, no traceback
                else:
                    if not known and self.forgotten is not None:
                        self.forgotten(transport, msg_id, now)
                conn.execute("RELEASE ack")
        for transport in {t for t, _m, _n in batch}:
            transport.poke()
