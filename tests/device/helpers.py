"""Building device cores over a real SQLite store in a temporary directory."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.core.items import DropReason, Outgoing
from agent.core.purposes import Purpose
from agent.device import CoreConfig, Device, build_device
from agent.store.database import Database
from agent.store.keys import FileKeyStore
from simulator.pki import DevPki


@dataclass
class Recorder:
    """A DeviceObserver that keeps what it was told."""

    dropped_ids: list[str] = field(default_factory=list)
    reasons: list[DropReason] = field(default_factory=list)
    queued_ids: list[str] = field(default_factory=list)
    acked_ids: list[str] = field(default_factory=list)
    wakes: int = 0
    stops: list[frozenset[Purpose]] = field(default_factory=list)

    def dropped(self, msg_ids: list[str], reason: DropReason) -> None:
        self.dropped_ids.extend(msg_ids)
        self.reasons.append(reason)

    def sendable(self) -> None:
        self.wakes += 1

    def stopped(self, purposes: frozenset[Purpose]) -> None:
        self.stops.append(purposes)

    def queued(self, msg_id: str, purpose: Purpose, at: float) -> None:
        self.queued_ids.append(msg_id)

    def acknowledged(self, msg_id: str, at: float) -> None:
        self.acked_ids.append(msg_id)


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
    core: Device | None = None

    def config(self) -> CoreConfig:
        return CoreConfig(
            device_id=self.device_id,
            serial="SN-1",
            model="smartmi.fan.x",
            policy_version=self.policy_version,
            firmware_version=self.firmware,
            outbox_cap=self.cap,
        )

    def open(self, *crash_dirs: Path) -> Device:
        if self.db is not None:
            self.db.close()
        self.db = Database(self.root / "state.db", synchronous="NORMAL")
        self.core = build_device(
            self.db,
            FileKeyStore(self.root / "keys"),
            self.config(),
            now=self.now,
            crash_dirs=crash_dirs or [self.root / "crash"],
            new_id=lambda: f"m{next(self.ids)}",
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


def granted_rig(root: Path, purpose: Purpose) -> Rig:
    """A rig whose device is bound to ``owner-1`` with ``purpose`` granted."""
    rig = Rig(root)
    core = rig.open()
    core.bind("owner-1", now=rig.tick())
    core.grant(purpose, now=rig.tick())
    return rig


OTHER_UID = 4242  # a user that owns nothing here


@contextlib.contextmanager
def as_other_user(uid: int = OTHER_UID) -> Iterator[None]:
    """Act as an unprivileged user for a while (root only; pytest skips otherwise), so
    that permission checks bite as they do for the service user."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory another user can pass through (pytest's own is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="smartmi-shared-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def install_identity(pki: DevPki, directory: Path, device_id: str) -> None:
    """The CA, and the certificate and private key of ``device_id``, as an agent.toml
    names them: ``ca.pem``, ``dev.pem`` and ``dev.key`` (0600) in ``directory``."""
    ident = pki.ensure_devices([device_id])[device_id]
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pki.ca_cert, directory / "ca.pem")
    shutil.copyfile(ident.cert, directory / "dev.pem")
    shutil.copyfile(ident.key, directory / "dev.key")
    os.chmod(directory / "dev.key", 0o600)
