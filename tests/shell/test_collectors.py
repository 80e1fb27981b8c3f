"""Collectors without a network: /proc parsing, crash files, the agent's own crash hooks."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from agent.core.items import Outgoing
from agent.core.purposes import Purpose
from agent.errors import StorageError
from agent.runtime import collectors
from agent.runtime.collectors import (
    CrashDirCollector,
    install_crash_hooks,
    network_snapshot,
    parse_crash_file,
    parse_if_inet6,
    parse_proc_route,
)
from agent.runtime.control import act
from tests.device.helpers import Rig, granted_rig

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
"""
INET6 = """fe800000000000000000000000000001 02 40 20 80 eth0
20010db8000000000000000000000001 02 40 00 80 eth0
26001f18000000000000000000000002 02 40 00 80 eth0
"""


def test_proc_route_gives_gateway_and_routes() -> None:
    gateway, routes = parse_proc_route(ROUTE)
    assert gateway == "192.168.2.1"
    assert routes == (
        {"destination": "0.0.0.0/0", "gateway": "192.168.2.1", "interface": "eth0"},
        {"destination": "192.168.2.0/24", "gateway": None, "interface": "eth0"},
    )


def test_if_inet6_keeps_global_addresses_only() -> None:
    assert parse_if_inet6(INET6) == ("2600:1f18::2",)


def test_network_snapshot_falls_back_to_nothing(tmp_path: Path) -> None:
    net = network_snapshot(tmp_path)  # no route or if_inet6 files here
    assert net.default_gateway is None
    assert net.routes == ()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"signature": "SIGSEGV", "stack": "s", "uptime_s": 3}', ("SIGSEGV", "s", 3.0)),
        (b"Traceback\n  File x\nValueError: boom\n", ("ValueError: boom", None, 0.0)),
    ],
)
def test_crash_file_formats(data: bytes, expected: tuple[str, str | None, float]) -> None:
    signature, stack, uptime = parse_crash_file(data)
    assert (signature, uptime) == (expected[0], expected[2])
    assert stack == (expected[1] if expected[1] is not None else data.decode())


@pytest.mark.parametrize("data", [b"", b"   ", b'{"signature": 1}', b'{"stack": ', b"x" * 300_000])
def test_unusable_crash_files_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r".+"):
        parse_crash_file(data)


def test_collector_captures_with_consent_and_discards_without(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    core = rig.open()
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    collector = CrashDirCollector(core, crash_dir, started=rig.now - 60)
    core.bind("b-1", now=rig.now)
    (crash_dir / "a.json").write_text(json.dumps({"signature": "S1", "stack": "x"}))
    (crash_dir / ".b.json.tmp").write_text("half written")
    (crash_dir / "c.txt").write_bytes(b"")
    assert collector.scan(rig.now) == 0
    assert (collector.discarded, collector.invalid) == (1, 1)
    assert not (crash_dir / "a.json").exists()  # not collected, not kept (P1)
    assert (crash_dir / "c.txt.invalid").exists()
    assert (crash_dir / ".b.json.tmp").exists()
    core.grant(Purpose.DIAGNOSTICS, now=rig.now)
    (crash_dir / "d.json").write_text(json.dumps({"signature": "S2", "stack": "y"}))
    assert collector.scan(rig.now) == 1
    sent: list[Outgoing] = rig.deliver_all()
    assert [o.kind for o in sent] == ["crash"]
    data = json.loads(sent[0].payload)["data"]
    assert data["signature"] == "S2"
    assert data["uptime_s"] == 60.0


def test_crash_hooks_write_reports_and_keep_a_fatal_dump(tmp_path: Path) -> None:
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    (crash_dir / "agent-fatal.log").write_text("Fatal Python error: Segmentation fault\n")
    loop = asyncio.new_event_loop()
    saved = sys.excepthook
    try:
        stream = install_crash_hooks(crash_dir, loop)
        try:
            raise RuntimeError("boom")  # noqa: TRY301  # raised to be handled by the hook
        except RuntimeError as exc:
            sys.excepthook(RuntimeError, exc, exc.__traceback__)
        loop.call_exception_handler({"message": "task died", "exception": KeyError("k")})
        stream.close()
    finally:
        sys.excepthook = saved
        loop.close()
        import faulthandler

        faulthandler.disable()
    names = sorted(p.name for p in crash_dir.iterdir())
    assert any(n.startswith("agent-fatal-") and n.endswith(".txt") for n in names)
    reports = [json.loads(p.read_text()) for p in crash_dir.glob("agent-*.json")]
    assert sorted(r["signature"] for r in reports) == ["KeyError", "RuntimeError"]


def test_a_simulated_crash_carries_the_addresses_and_routes_a_real_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "route").write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "wlan0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\n"
    )
    (proc / "if_inet6").write_text("")
    real = collectors.network_snapshot

    def fake(proc_dir: Path = proc) -> collectors.NetInfo:
        return real(proc_dir)

    monkeypatch.setattr(collectors, "network_snapshot", fake)
    monkeypatch.setattr(collectors, "_ipv4_addresses", lambda: ("10.0.2.7",))
    rig = granted_rig(tmp_path, Purpose.DIAGNOSTICS)
    assert rig.core is not None
    act(rig.core, {"verb": "crash"}, now=rig.tick())
    [sent] = rig.deliver_all()
    data = json.loads(sent.payload)["data"]
    assert data["ip_addresses"] == ["10.0.2.7"]
    assert data["default_gateway"] == "10.0.2.1"
    assert data["routes"] == [
        {"destination": "0.0.0.0/0", "gateway": "10.0.2.1", "interface": "wlan0"}
    ]


def test_links_and_fifos_in_the_drop_directory_are_refused_unread(tmp_path: Path) -> None:
    """Other users can write to the crash drop directory: a link to the agent's key
    is not followed, and a FIFO does not block the scan."""
    rig = granted_rig(tmp_path, Purpose.DIAGNOSTICS)
    assert rig.core is not None
    secret = tmp_path / "device.key"
    secret.write_text('Traceback (most recent call last):\nKeyError: "-----BEGIN KEY-----"\n')
    crash_dir = tmp_path / "drop"
    crash_dir.mkdir()
    (crash_dir / "link.txt").symlink_to(secret)
    os.mkfifo(crash_dir / "pipe.txt")
    collector = CrashDirCollector(rig.core, crash_dir, started=rig.now)
    assert collector.scan(rig.now) == 0
    assert collector.invalid == 2
    assert sorted(p.name for p in crash_dir.iterdir()) == ["link.txt.invalid", "pipe.txt.invalid"]
    assert rig.deliver_all() == []
    assert secret.exists()


def test_the_own_and_the_drop_directory_are_both_collected_and_both_wiped(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    own, drop = tmp_path / "crash", tmp_path / "spool"
    drop.mkdir(mode=0o1733)
    core = rig.open(own, drop)
    core.bind("owner-1", now=rig.tick())
    core.grant(Purpose.DIAGNOSTICS, now=rig.tick())
    collector = CrashDirCollector(core, own, drop, started=rig.now)
    own.mkdir(mode=0o700)
    (own / "agent-1.json").write_text(json.dumps({"signature": "Own", "stack": "x"}))
    (drop / "fan.json").write_text(json.dumps({"signature": "Fan", "stack": "y"}))
    assert collector.scan(rig.now) == 2
    sent = sorted(json.loads(o.payload)["data"]["signature"] for o in rig.deliver_all())
    assert sent == ["Fan", "Own"]
    (own / "agent-2.json").write_text("{}")
    (drop / "fan-2.json").write_text("{}")
    core.unbind(now=rig.tick())
    assert list(own.iterdir()) == []
    assert list(drop.iterdir()) == []


class Killed(BaseException):
    """The process died here (SIGKILL): nothing after this point ran."""


@pytest.mark.parametrize("killed", ["before the capture", "before the file is deleted"])
def test_a_crash_file_is_captured_exactly_once_across_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed: str
) -> None:
    rig = granted_rig(tmp_path, Purpose.DIAGNOSTICS)
    assert rig.core is not None
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    (crash_dir / "fan.json").write_text(json.dumps({"signature": "S1", "stack": "x"}))
    collector = CrashDirCollector(rig.core, crash_dir, started=rig.now)
    real_unlink = Path.unlink

    def die(*_args: object, **_kw: object) -> None:
        raise Killed

    def unlink(self: Path, missing_ok: bool = False) -> None:  # Path's own
        if self.name.startswith(collectors.CLAIM):
            raise Killed
        real_unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as m:
        if killed == "before the capture":
            m.setattr(rig.core, "capture_crash_file", die)
        else:
            m.setattr(Path, "unlink", unlink)
        with pytest.raises(Killed):
            collector.scan(rig.now)
    [claim] = list(crash_dir.iterdir())
    msg_id = claim.name.removeprefix(collectors.CLAIM)
    core = rig.open()  # the restart
    CrashDirCollector(core, crash_dir, started=rig.now).scan(rig.tick())
    assert list(crash_dir.iterdir()) == []
    assert [o.msg_id for o in rig.deliver_all()] == [msg_id]  # one item, the claim's
    assert not core.crash_file_captured(msg_id)  # its note went with the file


def test_a_claim_the_store_cannot_judge_is_left_for_the_next_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = granted_rig(tmp_path, Purpose.DIAGNOSTICS)
    assert rig.core is not None
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    claim = crash_dir / (collectors.CLAIM + "ab" * 16)
    claim.write_text(json.dumps({"signature": "S1", "stack": "x"}))
    collector = CrashDirCollector(rig.core, crash_dir, started=rig.now)

    def unreadable(_msg_id: str) -> bool:
        raise StorageError("state.db: database disk image is malformed", kind="corrupt")

    with monkeypatch.context() as m:
        m.setattr(rig.core, "crash_file_captured", unreadable)
        assert collector.scan(rig.now) == 0  # no exception out of the scan loop
    assert claim.exists()
    assert rig.deliver_all() == []  # not captured while it cannot be told
    assert collector.scan(rig.tick()) == 1  # the store answers again: captured once
    assert [o.msg_id for o in rig.deliver_all()] == ["ab" * 16]
