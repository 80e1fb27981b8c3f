"""Costs of the device core: capture-to-queue, and withdrawal with 10,000 items pending.

Each figure comes with a baseline measured in the same run on the same disk: a bare
SQLite insert (or delete) of the same bytes with the same synchronous mode, so
the ratio says what the agent's rules and encryption add, whatever the machine's load.
"""

from __future__ import annotations

import math
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.core.purposes import Purpose
from agent.device import CoreConfig, CrashReport, Device, build_device
from agent.store.database import Database, Synchronous
from agent.store.keys import FileKeyStore

REPORT = CrashReport(
    signature="SIGSEGV in fan_ctl",
    stack="Traceback (most recent call last):\n" + '  File "/usr/lib/fan.py", line 1\n' * 20,
    ip_addresses=("192.0.2.7",),
    default_gateway="192.0.2.1",
)


def device(root: Path, sync: Synchronous) -> Device:
    """A bound device with diagnostics granted, on its own store in ``root``."""
    db = Database(root / "state.db", synchronous=sync)
    config = CoreConfig("bench-1", "S", "m", "1", outbox_cap=1_000_000)
    core = build_device(db, FileKeyStore(root / "keys"), config, now=1e9)
    core.bind("b", now=1e9)
    core.grant(Purpose.DIAGNOSTICS, now=1e9)
    return core


def _pcts(samples: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(samples, n=100)
    return {
        "mean_us": statistics.fmean(samples) * 1e6,
        "p50_us": qs[49] * 1e6,
        "p99_us": qs[98] * 1e6,
    }


def _bare_insert(root: Path, sync: str, payload: bytes, n: int) -> list[float]:
    conn = sqlite3.connect(root / "bare.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, k TEXT, blob BLOB)")
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (k, blob) VALUES (?, ?)", (str(i), payload))
        conn.execute("COMMIT")
        out.append(time.perf_counter() - t0)
    conn.close()
    return out


def capture_to_queue(sync: Synchronous, n: int = 2000) -> dict[str, Any]:
    """Time capture_crash (gate, scrub, schema, seal, durable insert) against a bare insert."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        core = device(root, sync)
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            core.capture_crash(REPORT, now=1e9 + i)
            samples.append(time.perf_counter() - t0)
        size = len(core.store.queued(1)[0].payload)
        bare = _bare_insert(root, sync, os.urandom(size + 29), n)
    figures = _pcts(samples)
    baseline = statistics.median(bare) * 1e6
    return {
        "name": f"capture-to-queue ({sync})",
        **figures,
        "baseline_p50_us": baseline,
        "ratio_p50": figures["p50_us"] / baseline,
    }


def withdrawal(pending: int = 10_000, sync: Synchronous = "FULL") -> dict[str, Any]:
    """Time withdraw() with ``pending`` items of the purpose queued."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        core = device(root, sync)
        with core.store.db.transaction():
            for i in range(pending):
                core.capture_crash(REPORT, now=1e9 + i)
        if core.queued_count() != pending:
            raise RuntimeError(f"set-up queued {core.queued_count()} items, not {pending}")
        # The set-up's WAL is folded in first, as SQLite does every 1,000 pages in use:
        # otherwise the withdrawal's commit would pay for checkpointing the set-up.
        core.store.db.checkpoint()
        t0 = time.perf_counter()
        removed = core.withdraw(Purpose.DIAGNOSTICS, now=2e9)
        took = time.perf_counter() - t0
        if removed != pending or core.store.count() != 0 or core.store.queued(1):
            raise RuntimeError("withdraw left items behind: the figure would be meaningless")
        # Baseline: the same number of rows deleted from a bare table in one statement.
        conn = sqlite3.connect(root / "bare.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {sync}")
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, p TEXT, blob BLOB)")
        conn.execute("CREATE INDEX tp ON t (p)")
        blob = os.urandom(len(REPORT.stack) + 400)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (p, blob) VALUES ('d', ?)", [(blob,)] * pending)
        conn.execute("COMMIT")
        t1 = time.perf_counter()
        conn.execute("DELETE FROM t WHERE p = 'd'")
        base = time.perf_counter() - t1
        conn.close()
    return {
        "name": f"withdraw with {pending} pending ({sync})",
        "ms": took * 1e3,
        "baseline_ms": base * 1e3,
        "ratio": took / base,
    }


def withdrawal_p99(pending: int = 10_000, reps: int = 10) -> dict[str, Any]:
    """``withdrawal`` repeated; p99 by nearest rank (with 10 runs, the slowest)."""
    runs = [withdrawal(pending, "FULL") for _ in range(reps)]
    times = sorted(r["ms"] for r in runs)
    rank = max(1, math.ceil(0.99 * len(times)))
    return {
        "name": f"withdraw with {pending} pending (FULL), {reps} runs",
        "p99_ms": times[rank - 1],
        "p50_ms": times[len(times) // 2],
        "baseline_ms": sorted(r["baseline_ms"] for r in runs)[len(runs) // 2],
    }
