"""Building a device over a store, and opening the one of a state directory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from agent.config import AgentConfig
from agent.core.settings import CoreConfig
from agent.device.device import Device, new_msg_id
from agent.store.database import Database
from agent.store.keys import FileKeyStore, KeyStore
from agent.store.records import DeviceStore
from agent.store.statedir import locked


def build_device(
    db: Database,
    keys: KeyStore,
    config: CoreConfig,
    *,
    now: float,
    crash_dirs: Sequence[Path] = (),
    new_id: Callable[[], str] = new_msg_id,
) -> Device:
    """The device ``config`` names over ``db`` and ``keys``: how the daemon, the fleet,
    the tests and the benchmark each build one."""
    store = DeviceStore(db, config.device_id, keys)
    return Device(store, config, now=now, crash_dirs=crash_dirs, new_id=new_id)


@contextlib.contextmanager
def open_device(
    config: AgentConfig, *, now: float | None = None, wait_s: float = 0.0
) -> Iterator[Device]:
    """The device over its state directory, locked for the duration (waiting up to
    ``wait_s`` for another process to let the lock go)."""
    with locked(config.state_dir, wait_s=wait_s):
        db = Database(config.state_dir / "state.db")
        try:
            yield build_device(
                db,
                FileKeyStore(config.state_dir / "keys"),
                config.core_config(),
                now=time.time() if now is None else now,
                crash_dirs=config.crash_dirs,
            )
        finally:
            db.close()
