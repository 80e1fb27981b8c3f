"""A real daemon and a real broker on a state directory that fills up: a small tmpfs.

Where mounting is not allowed (not root, no tmpfs) these tests are skipped with that
reason; the core's fault handling is also tested without a mount in
``tests/device/test_storage_faults.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main as cli
from simulator.broker import MosquittoBroker
from simulator.cloud import Cloud
from simulator.faults import FaultProxy
from simulator.pki import DevPki
from simulator.rig import until
from tests.e2e.test_daemon import DEVICE, agent, log_line, spawn, write_config

pytestmark = pytest.mark.asyncio


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at tmp_path/state."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; the filler's path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="No space left") as err:
        (directory / "probe").write_bytes(b"x" * 4096)
    assert err.value.errno == errno.ENOSPC
    return filler


def crash_dir_outside(conf: Path) -> Path:
    """Crash files are dropped outside the full disk (other processes have room)."""
    crashes = conf.parent / "crash"
    crashes.mkdir(mode=0o700, exist_ok=True)
    text = conf.read_text().replace(
        'state_dir = "state"', f'state_dir = "state"\ncrash_dir = "{crashes}"'
    )
    conf.write_text(text)
    return crashes


@pytest.mark.slow
async def test_a_full_disk_never_stops_the_daemon_or_a_withdrawal_or_a_wipe(  # noqa: PLR0917  # fixtures
    tmp_path: Path,
    small_disk: Path,
    broker: MosquittoBroker,
    pki: DevPki,
    cloud: Cloud,
    capsys: pytest.CaptureFixture[str],
) -> None:
    conf = write_config(tmp_path, broker, pki)
    crashes = crash_dir_outside(conf)
    # The daemon reaches the broker through a proxy that is cut at first.
    proxy = FaultProxy(broker.host, broker.port, random.Random(7))
    await proxy.start()
    proxy.partition(True)
    conf.write_text(conf.read_text().replace(broker.url, f"mqtts://127.0.0.1:{proxy.port}"))
    # Twenty items wait; the daemon starts; then the disk fills up and the path heals.
    agent(conf, capsys, "bind", "--binding-id", "owner-full")
    agent(conf, capsys, "consent", "grant", "diagnostics")
    queued = [str(agent(conf, capsys, "crash", "--simulate")["queued"]) for _ in range(20)]
    proc = await spawn(conf)
    try:
        await log_line(proc, "started")
        filler = fill(small_disk)
        proxy.partition(False)
        await log_line(proc, "connected")
        # All twenty reach the broker; their acknowledgements cannot be written, so the
        # drain pauses: no re-send loop (each exactly once, judged at the end).
        try:
            await until(cloud, lambda: len(cloud.of(DEVICE, "crash")) >= 20)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            assert proc.stderr is not None
            raise AssertionError((await proc.stderr.read()).decode()[-4000:]) from None
        arrived = [m.envelope()["msg_id"] for m in cloud.of(DEVICE, "crash")]
        assert sorted(arrived) == sorted(queued)
        status = agent(conf, capsys, "status")
        storage = status["storage"]
        assert isinstance(storage, dict)
        assert storage["ok"] is False
        assert storage["kind"] == "full"
        assert storage["acknowledgements_not_recorded"] == 20
        # A crash that cannot be stored is dropped and counted, the daemon lives.
        (crashes / ".c.tmp").write_text('{"signature": "SIGSEGV", "stack": "at x.c:1"}')
        (crashes / ".c.tmp").rename(crashes / "c.json")
        for _ in range(100):
            # Gone (also as a claim being captured), then the status: it counts the drop.
            gone = not (crashes / "c.json").exists() and not list(crashes.glob(".smartmi-*"))
            status = agent(conf, capsys, "status")
            if gone:
                break
            await asyncio.sleep(0.2)
        assert status["dropped"] == {"storage": 1}
        # A withdrawal on the full disk takes effect (the reserve pays for it).
        agent(conf, capsys, "consent", "withdraw", "diagnostics")
        status = agent(conf, capsys, "status")
        assert status["consent"] == {"activation": "not-granted", "diagnostics": "not-granted"}
        # Space returns: the acknowledgements are recorded, nothing is sent twice.
        filler.unlink()
        for _ in range(100):
            status = agent(conf, capsys, "status")
            storage = status["storage"]
            assert isinstance(storage, dict)
            if storage["ok"]:
                break
            await asyncio.sleep(0.2)
        assert storage["ok"] is True, storage
        assert status["queued"] == 0
        # Full again, then an unbind: the wipe completes and its deletion request leaves.
        filler = fill(small_disk)
        agent(conf, capsys, "unbind")
        await until(cloud, lambda: len(cloud.of(DEVICE, "deletion-request")) >= 1)
        # The deletion request is the marker: a crash sent again at any time before it,
        # on the full disk or once space returned, arrived before it. It is on another
        # topic, which MQTT does not order against up/crash (v5 §4.6); Mosquitto does,
        # routing one client's PUBLISHes as it reads them into the cloud's one queue.
        # Sent again after it nothing can be: the wipe took the crashes.
        got = cloud.of(DEVICE)
        before = got[: [m.kind for m in got].index("deletion-request")]
        assert sorted(m.msg_id or "" for m in before) == sorted(queued)  # each exactly once
        status = agent(conf, capsys, "status")
        assert status["lifecycle"] == "factory-new"
        assert not list((small_disk / "keys").glob("*.data.key"))
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proxy.close()
    leftovers = await asyncio.to_thread(lambda: [p.name for p in small_disk.rglob(".*tmp*")])
    assert leftovers == []  # never a half-written file


async def test_a_read_only_state_directory_is_a_clear_error(
    tmp_path: Path,
    small_disk: Path,
    broker: MosquittoBroker,
    pki: DevPki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    conf = write_config(tmp_path, broker, pki)
    agent(conf, capsys, "bind", "--binding-id", "owner-ro")
    remount = await asyncio.create_subprocess_exec(
        "mount", "-o", "remount,ro", str(small_disk), stderr=asyncio.subprocess.PIPE
    )
    _, remount_err = await remount.communicate()
    assert remount.returncode == 0, remount_err
    proc = await spawn(conf)
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        err = (await proc.stderr.read()).decode()
        assert await proc.wait() == 1
    assert "Traceback" not in err
    assert f"{small_disk}: Read-only file system (read-only)" in err
    assert cli(["--config", str(conf), "consent", "grant", "activation"]) == 1
    assert "(read-only)" in capsys.readouterr().err
