"""``smartmi-sim broker up`` on a port that is taken or impossible: one line, nothing
left behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from simulator.broker import MosquittoBroker
from simulator.cli import main
from simulator.pki import DevPki


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
