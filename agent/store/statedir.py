"""The state directory: one device's store and keys, opened under an exclusive lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from agent.config import AgentConfig
from agent.device import DeviceCore
from agent.errors import StoreLocked
from agent.store.database import Database, DeviceStore
from agent.store.vault import FileKeyStore


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold the state directory's lock, or raise StoreLocked at once."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(
                f"another smartmi-agent process (usually the daemon) holds {state_dir}"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_device(config: AgentConfig, *, now: float | None = None) -> Iterator[DeviceCore]:
    """The device core over the state directory, locked for the duration."""
    with locked(config.state_dir):
        db = Database(config.state_dir / "state.db")
        try:
            store = DeviceStore(db, config.device.id, FileKeyStore(config.state_dir / "keys"))
            yield DeviceCore(store, config.core_config(), now=time.time() if now is None else now)
        finally:
            db.close()
