"""A fleet on a 3-node NATS cluster (SPEC §5): nodes killed mid-run lose nothing.

Needs Debian's ``nats-server`` (CI installs it); skipped with a reason where it is
missing. Every node listens on loopback only, with certificates made for the session.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from bench import kill9
from simulator.cli import main
from simulator.nats import NatsCluster
from simulator.pki import DevPki

SCENARIOS = Path(__file__).resolve().parents[2] / "simulator" / "scenarios"

pytestmark = pytest.mark.skipif(
    shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists(),
    reason="nats-server is not installed (Debian: apt-get install nats-server)",
)


@pytest.mark.slow  # a 3-node NATS cluster and a fleet
@pytest.mark.timeout(600)  # two node kills and the drain of every acknowledged item
def test_a_fleet_on_a_cluster_loses_nothing_when_nodes_are_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The scenario's two broker-restart events each kill a node with -9 mid-stream
    # and start it again; devices and backend fall back to the other nodes meanwhile.
    out = tmp_path / "report.json"
    rc = main(
        [
            "--dir", str(tmp_path / "dev"), "run", "--devices", "30", "--cluster", "3",
            "--scenario", str(SCENARIOS / "broker-restart.toml"), "--report", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    doc = json.loads(out.read_text())
    assert doc["violations"] == []
    assert doc["connect"]["connected"] == 30
    assert doc["delivery"]["broker_restarts"] == 2
    # Nothing the broker acknowledged was lost to the killed nodes.
    assert doc["delivery"]["broker_custody"] == 0
    # 30 devices x 25 crash reports and one activation each, every one delivered
    # (a redelivery after a node's failure may come twice; the cloud de-duplicates).
    assert doc["delivery"]["unique"] == 30 * 25 + 30
    assert doc["delivery"]["drained"] is True
    assert "3-node NATS cluster" in printed.err


def test_a_cluster_of_two_is_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "--dir", str(tmp_path / "dev"), "run", "--devices", "3", "--cluster", "2",
            "--scenario", str(SCENARIOS / "smoke.toml"), "--report", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "--cluster 2: use 1, or 3 or more nodes" in err
    assert "Traceback" not in err


@pytest.mark.slow  # a 3-node NATS cluster and a fleet
@pytest.mark.timeout(600)  # twenty kills, each waiting for a node to catch up
def test_twenty_kills_of_a_node_lose_no_acknowledged_item(tmp_path: Path) -> None:
    # Four agents publish about 200 crash reports a second while a random node is
    # killed with -9 twenty times, 0.3-0.8 s apart, each started again once the MQTT
    # streams caught up on it (python -m bench.kill9 prints the same loop's figures).
    pki = DevPki(tmp_path / "pki").ensure()
    with NatsCluster(pki, nodes=3) as cluster:
        counts = asyncio.run(kill9.loop(cluster, tmp_path / "run", 20, pki))
    assert counts["acknowledged"] == counts["captured"] > 1000
    assert counts["lost"] == 0
    assert counts["received"] == counts["acknowledged"]
