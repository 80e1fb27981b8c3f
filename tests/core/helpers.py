"""Building device cores over a real SQLite store in a temporary directory."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.items import Outgoing
from agent.device import CoreConfig, DeviceCore
from agent.store.database import Database, DeviceStore
from agent.store.vault import FileKeyStore


@dataclass
class Rig:
    """A device core with its store, reopenable as after a reboot."""

    root: Path
    device_id: str = "dev-1"
    policy_version: str = "1"
    firmware: str = "1.0.0"
    cap: int = 10_000
    now: float = 1_800_000_000.0
    ids: itertools.count[int] = field(default_factory=itertools.count)
    db: Database | None = None
    core: DeviceCore | None = None

    def config(self) -> CoreConfig:
        return CoreConfig(
            device_id=self.device_id,
            serial="SN-1",
            model="smartmi.fan.x",
            policy_version=self.policy_version,
            firmware_version=self.firmware,
            outbox_cap=self.cap,
            crash_dir=self.root / "crash",
        )

    def open(self) -> DeviceCore:
        if self.db is not None:
            self.db.close()
        self.db = Database(self.root / "state.db", synchronous="NORMAL")
        store = DeviceStore(self.db, self.device_id, FileKeyStore(self.root / "keys"))
        self.core = DeviceCore(
            store, self.config(), now=self.now, new_id=lambda: f"m{next(self.ids)}"
        )
        return self.core

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now

    def deliver_all(self) -> list[Outgoing]:
        """Hand off everything sendable and acknowledge it."""
        assert self.core is not None
        sent: list[Outgoing] = []
        while batch := self.core.next_batch(now=self.now, limit=64):
            for item in batch:
                self.core.acknowledged(item.msg_id, now=self.now)
            sent += batch
        return sent
