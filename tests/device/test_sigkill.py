"""SIGKILL a writer at random points, hundreds of times; the store must stay whole.

After every kill: SQLite's integrity check passes, every record opens, no item
acknowledged before the kill is queued again, no queued item is lost, and an
acknowledgement cut short is either wholly done or not done at all.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.device import sigkill_writer

KILLS = 200


def _check(root: Path, log: Path) -> tuple[int, int]:
    queued: set[str] = set()
    acking: set[str] = set()
    acked: set[str] = set()
    for line in log.read_text().splitlines():
        tag, msg_id = line.split()
        {"Q": queued, "A-": acking, "A+": acked}[tag].add(msg_id)
    with sqlite3.connect(root / "state.db") as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    core = sigkill_writer.open_core(root)
    try:
        in_outbox = {i.msg_id for i in core.store.queued(1 << 30)}
        ledgered = {e["msg_id"] for e in core.store.ledger() if e["type"] == "sent"}
        assert core.store.problems == [], "a record failed to open after a kill"
        assert core.store.quarantined() == 0
        assert not (acked & in_outbox), "acknowledged item came back"
        assert acked <= ledgered, "acknowledged item missing from the ledger"
        lost = queued - acking - in_outbox
        assert not lost, f"queued items lost: {sorted(lost)[:5]}"
        for msg_id in acking - acked:  # killed mid-acknowledgement: all or nothing
            assert (msg_id in in_outbox) != (msg_id in ledgered), msg_id
        assert not (in_outbox & ledgered)
        return len(queued), len(acked)
    finally:
        core.store.db.close()


@pytest.mark.slow
def test_sigkill_at_random_points(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.device.sigkill_writer"])
    rng = random.Random(20261122)
    log = tmp_path / "log"
    log.touch()
    totals = (0, 0)
    for i in range(KILLS):
        started = ctx.Event()
        proc = ctx.Process(target=sigkill_writer.run, args=(tmp_path, log, i, started), daemon=True)
        proc.start()
        # A random kill point, not a wait for an event: one kill in five lands while
        # the writer opens the store, the rest once it has started working.
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.03))
        else:
            assert started.wait(30), "the writer did not start"
            time.sleep(rng.uniform(0.0, 0.05))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL, "the writer died on its own"
        totals = _check(tmp_path, log)
    queued, acked = totals
    # The writer made progress across the kills (otherwise nothing was tested).
    assert queued >= KILLS // 2, queued
    assert acked >= 10, acked
