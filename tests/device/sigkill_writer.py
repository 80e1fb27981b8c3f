"""The writer process of the SIGKILL test: random captures and acknowledgements, logged.

Log lines (written with os.write, so they are in the kernel before the next step):
``Q id`` after an item is durably queued, ``A- id`` just before its acknowledgement
is recorded, ``A+ id`` just after.
"""

from __future__ import annotations

import os
import random
import time
from multiprocessing.synchronize import Event
from pathlib import Path

from agent.core.purposes import Purpose
from agent.device import CoreConfig, CrashReport, Device, build_device
from agent.store.database import Database
from agent.store.keys import FileKeyStore

DEVICE = "kill-1"


def open_core(root: Path) -> Device:
    """The core as the writer and the checker both open it."""
    db = Database(root / "state.db", synchronous="FULL")
    config = CoreConfig(device_id=DEVICE, serial="S", model="m", firmware_version="1")
    return build_device(db, FileKeyStore(root / "keys"), config, now=time.time())


def run(root: Path, log_path: Path, seed: int, started: Event) -> None:
    """Work until killed."""
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    core = open_core(root)
    if core.status()["lifecycle"] == "factory-new":
        core.bind("b", now=time.time())
        core.grant(Purpose.DIAGNOSTICS, now=time.time())
    report = CrashReport("sig", "stack " * rng.randint(1, 50))
    started.set()
    while True:
        if rng.random() < 0.6:
            msg_id = core.capture_crash(report, now=time.time())
            os.write(log, f"Q {msg_id}\n".encode())
        else:
            for out in core.next_batch(now=time.time(), limit=rng.randint(1, 4)):
                os.write(log, f"A- {out.msg_id}\n".encode())
                core.acknowledged(out.msg_id, now=time.time())
                os.write(log, f"A+ {out.msg_id}\n".encode())
