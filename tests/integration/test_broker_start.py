"""``smartmi-sim broker up`` on a port that is taken or impossible: one line, nothing
left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from simulator.broker import MosquittoBroker
from simulator.cli import main
from simulator.pki import DevPki
from tests.sim_process import alive, descendants


def _runtime_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("smartmi-broker-*"))


def test_a_busy_port_is_named_before_any_banner(
    broker: MosquittoBroker, pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _runtime_dirs()
    rc = main(["--dir", str(pki.root.parent), "broker", "up", "--port", str(broker.port)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"port {broker.port} on 127.0.0.1 is not free" in err
    assert "listening" not in out  # no banner for a broker that is not ours
    assert _runtime_dirs() <= before


def test_an_impossible_port_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _runtime_dirs()
    rc = main(["--dir", str(tmp_path), "broker", "up", "--port", "80000"])
    assert rc == 1
    assert "--port 80000: a TCP port is 1 to 65535" in capsys.readouterr().err
    assert _runtime_dirs() <= before


def test_a_killed_broker_up_leaves_no_broker_and_no_key(tmp_path: Path) -> None:
    """kill -9 of ``smartmi-sim broker up``: nothing can clean up in the process itself,
    yet its Mosquitto stops and the runtime directory with the broker's key goes."""
    before = _runtime_dirs()
    cmd = [sys.executable, "-m", "simulator.cli", "--dir", str(tmp_path), "broker", "up"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as up:
        assert up.stdout is not None
        line = b""
        deadline = time.monotonic() + 60
        while b"listening on" not in line:
            line = up.stdout.readline()
            assert line, "broker up ended before it was listening"
            assert time.monotonic() < deadline
        [runtime] = _runtime_dirs() - before
        assert (runtime / "broker.key").exists()
        mosquitto = [
            p
            for p in descendants(up.pid)
            if b"mosquitto" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert len(mosquitto) == 1
        up.kill()
        up.wait(10)
    deadline = time.monotonic() + 10
    while (alive(mosquitto[0]) or runtime.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(mosquitto[0])
    assert not runtime.exists()
