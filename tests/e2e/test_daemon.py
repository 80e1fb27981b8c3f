"""The daemon as systemd runs it: a real process, its control socket, SIGTERM, the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.cli import main as cli
from simulator.broker import MosquittoBroker
from simulator.cloud import Cloud
from simulator.pki import DevPki
from simulator.rig import until
from tests import hostile_crashes

pytestmark = pytest.mark.asyncio

DEVICE = "daemon-e2e-1"


def write_config(root: Path, broker: MosquittoBroker, pki: DevPki) -> Path:
    ident = pki.ensure_devices([DEVICE])[DEVICE]
    path = root / "agent.toml"
    path.write_text(
        f"""
[device]
id = "{DEVICE}"
serial = "SN-D1"
model = "smartmi.fan.za5"
firmware_version = "3.0.0"

[privacy]
policy_version = "1"

[paths]
state_dir = "state"

[broker]
url = "{broker.url}"
ca = "{pki.ca_cert}"
cert = "{ident.cert}"
key = "{ident.key}"
"""
    )
    return path


async def log_line(proc: asyncio.subprocess.Process, msg: str) -> dict[str, object]:
    """Read the daemon's JSON log until a line with ``msg``."""
    assert proc.stderr is not None
    seen = []
    async with asyncio.timeout(20):
        while line := await proc.stderr.readline():
            seen.append(line.decode(errors="replace"))
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("msg") == msg:
                return dict(doc)
    raise AssertionError(f"the daemon ended before logging {msg!r}: {''.join(seen)[-2000:]}")


async def spawn(conf: Path) -> asyncio.subprocess.Process:
    """``smartmi-agent --config CONF run`` as systemd starts it, its log on a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "--config", str(conf), "run",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest_asyncio.fixture
async def daemon(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    conf = write_config(tmp_path, broker, pki)
    proc = await spawn(conf)
    try:
        yield proc, conf
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def agent(conf: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    """A CLI verb that must succeed; its JSON output."""
    rc = cli(["--config", str(conf), "--json", *argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return dict(json.loads(out))


async def test_daemon_serves_the_cli_sends_and_stops_cleanly(
    daemon: tuple[asyncio.subprocess.Process, Path],
    cloud: Cloud,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc, conf = daemon
    await log_line(proc, "connected")
    sock = conf.parent / "state" / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    status = agent(conf, capsys, "status")
    transport = status["transport"]
    assert isinstance(transport, dict)
    assert transport["connected"] is True
    assert 0 < transport["start_to_connected_s"] < 10
    # For a person: the first line says the daemon runs and what it did.
    assert cli(["--config", str(conf), "status"]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[0].startswith("daemon      running: connected, commands ")
    assert any(line.startswith("consent     ") for line in summary)
    # The verbs reach the daemon through the socket (the state lock is the daemon's).
    agent(conf, capsys, "bind", "--binding-id", "b-d1")
    agent(conf, capsys, "location", "set", "52.520008", "13.404954")
    agent(conf, capsys, "consent", "grant", "activation")
    await until(cloud, lambda: len(cloud.of(DEVICE)) >= 1)
    activation = cloud.of(DEVICE)[0].envelope()
    assert activation["data"]["location"] == {"lat": 52.5, "lon": 13.4, "precision": "region"}
    # A crash report dropped by another device process is collected with consent.
    agent(conf, capsys, "consent", "grant", "diagnostics")
    crash_dir = conf.parent / "state" / "crash"
    (crash_dir / ".fan.json.tmp").write_text(
        json.dumps({"signature": "SIGABRT in fan_ctl", "stack": "at /home/bob/fan.c:12"})
    )
    (crash_dir / ".fan.json.tmp").rename(crash_dir / "fan.json")
    # And the hostile corpus: none of its secrets leaves (P12).
    for n, text in enumerate(hostile_crashes.TEXTS.values()):
        (crash_dir / f".h{n}.tmp").write_text(text)
        (crash_dir / f".h{n}.tmp").rename(crash_dir / f"hostile-{n}.txt")
    expected = 1 + len(hostile_crashes.TEXTS)
    await until(cloud, lambda: len(cloud.of(DEVICE, "crash")) >= expected)
    crashes = [m.envelope()["data"] for m in cloud.of(DEVICE, "crash")]
    fan = next(c for c in crashes if c["exception"] == "SIGABRT")
    assert fan["frames"] == [{"module": "<external>", "function": "<unknown>", "line": 12}]
    assert fan["ip_addresses"]  # read from the OS
    for message in cloud.of(DEVICE, "crash"):
        assert hostile_crashes.leaked(message.payload) == []
    assert not (crash_dir / "fan.json").exists()
    # systemd's stop: a clean exit, the socket gone, the state intact.
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        assert await proc.wait() == 0
    assert not sock.exists()
    after = agent(conf, capsys, "status")  # now directly on the state directory
    assert after["lifecycle"] == "activated"
    assert after["queued"] == 0
    sent = agent(conf, capsys, "export")["entries"]
    assert isinstance(sent, list)
    assert {e["msg_id"] for e in sent if e["type"] == "sent"} == {
        activation["msg_id"],
        *(m.envelope()["msg_id"] for m in cloud.of(DEVICE, "crash")),
    }


async def test_daemon_refuses_a_second_instance_and_bad_config(
    daemon: tuple[asyncio.subprocess.Process, Path], tmp_path: Path
) -> None:
    proc, conf = daemon
    await log_line(proc, "started")
    second = await spawn(conf)
    _, err = await second.communicate()
    assert second.returncode == 1
    assert b"holds" in err  # another process holds the state directory
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.read_text().replace('url = "mqtts://', 'url = "mqtt://'))
    third = await spawn(bad)
    _, err = await third.communicate()
    assert third.returncode == 1
    assert b"must be an mqtts:// URL" in err
    assert b"broker.url: 'mqtt://" in err


@pytest.mark.parametrize("target", ["tls-key", "state-dir"])
async def test_the_daemon_refuses_secrets_open_to_others(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki, target: str
) -> None:
    conf = write_config(tmp_path, broker, pki)
    ident = pki.ensure_devices([DEVICE])[DEVICE]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = ident.key if target == "tls-key" else state
    before = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0o644 if target == "tls-key" else 0o777)
    try:
        proc = await spawn(conf)
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            err = (await proc.stderr.read()).decode()
            assert await proc.wait() == 1
    finally:
        path.chmod(before)
    assert f"{path} (" in err
    assert "chmod" in err
    assert "Traceback" not in err


async def test_the_daemon_refuses_another_devices_certificate(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    # It would connect as the other device and push it off the broker on every retry.
    conf = write_config(tmp_path, broker, pki)
    other = pki.ensure_devices(["someone-else"])["someone-else"]
    mine = pki.device(DEVICE)
    conf.write_text(
        conf.read_text()
        .replace(str(mine.cert), str(other.cert))
        .replace(str(mine.key), str(other.key))
    )
    proc = await spawn(conf)
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        err = (await proc.stderr.read()).decode()
        assert await proc.wait() == 1
    assert f"is the certificate of 'someone-else', but [device] id is '{DEVICE}'" in err
    assert "Traceback" not in err


async def test_a_rolled_back_store_is_found_out_by_the_daemon(
    tmp_path: Path,
    broker: MosquittoBroker,
    pki: DevPki,
    cloud: Cloud,
    capsys: pytest.CaptureFixture[str],
) -> None:
    conf = write_config(tmp_path, broker, pki)
    state = tmp_path / "state"
    agent(conf, capsys, "bind", "--binding-id", "owner-rb")
    agent(conf, capsys, "consent", "grant", "diagnostics")
    for _ in range(3):
        agent(conf, capsys, "crash", "--simulate")
    old = (state / "state.db").read_bytes()  # closed cleanly: one file holds it all
    agent(conf, capsys, "consent", "withdraw", "diagnostics")
    (state / "state.db").write_bytes(old)  # the attacker restores the older store
    proc = await spawn(conf)
    try:
        await log_line(proc, "record failed its integrity check; moved to quarantine")
        await log_line(proc, "commands synced")  # personal data may leave from here on
        status = agent(conf, capsys, "status")
        assert status["consent"] == {"activation": "not-bound", "diagnostics": "not-bound"}
        quarantined = status["quarantined"]
        assert isinstance(quarantined, int)
        assert quarantined >= 4  # the state row and its 3 items, with the ledger
        # A new owner's activation is the marker. A restored crash would have been
        # sendable since the sync, and the outbox goes out oldest first on the one
        # connection: it would arrive first. MQTT orders only one topic (v5 §4.6) and
        # this is another; Mosquitto routes one client's PUBLISHes in the order it
        # reads them into the cloud's one queue, which is what bounds this.
        agent(conf, capsys, "bind", "--binding-id", "owner-new")
        agent(conf, capsys, "consent", "grant", "activation")
        await until(cloud, lambda: bool(cloud.of(DEVICE, "activation")))
        got = [m.kind for m in cloud.of(DEVICE)]
        assert got[: got.index("activation")] == []  # nothing from the restored outbox
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
