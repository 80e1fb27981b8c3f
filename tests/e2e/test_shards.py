"""A fleet in shards (SPEC §5): ``--workers N`` on one host, ``--shard K/N`` on many,
one checker over all of them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent.core.identity import backend_id, up_filter
from agent.runtime.tls import client_context
from simulator.broker import MosquittoBroker
from simulator.cli import main
from simulator.cloud import Cloud
from simulator.pki import DevPki
from tests.mqtt_probe import PahoClient
from tests.prometheus import prometheus_samples
from tests.sim_process import alive, descendants, interrupted_run

SCENARIOS = Path(__file__).parents[2] / "simulator" / "scenarios"
SMOKE = SCENARIOS / "smoke.toml"


@pytest.mark.slow
def test_workers_are_judged_together_as_one_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    rc = main(
        [
            "--dir", str(tmp_path / "dev"), "run", "--devices", "300", "--workers", "2",
            "--scenario", str(SMOKE), "--report", str(out),
            "--metrics", str(tmp_path / "fleet.prom"),
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    doc = json.loads(out.read_text())
    assert doc["shards"] == 2
    assert doc["memory"]["broker_peak_kib"] > 1024  # the Mosquitto the workers shared
    figures = prometheus_samples(tmp_path / "fleet.prom")  # the shards' files, summed
    assert figures["smartmi_agent_agents"] == 300
    assert figures["smartmi_agent_acknowledged_total"] == doc["delivery"]["unique"] == 945
    assert doc["devices"] == doc["connect"]["connected"] == 300
    assert doc["violations"] == []
    # The same counts as the same scenario in one process (tests/e2e/test_sim_run.py).
    assert doc["delivery"]["by_kind"]["activation"] == 285
    assert doc["delivery"]["by_kind"]["deletion-request"] == 45
    # Each backend consumer keeps only its own shard's messages: nothing twice.
    assert doc["delivery"]["duplicates"] == 0
    assert "300 devices in 2 shards" in printed.out


@pytest.mark.slow
def test_shards_run_apart_and_check_judges_them_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As on two hosts against one broker: each shard with its own backend consumer.
    pki = DevPki(tmp_path / "dev" / "pki").ensure()
    files: dict[str, list[str]] = {"--timeline": [], "--capture": []}
    with MosquittoBroker(pki) as broker:
        for k in (1, 2):
            ident = pki.backend_consumer(k)
            timeline, received = tmp_path / f"t{k}.json", tmp_path / f"c{k}.txt"
            rc = main(
                [
                    "--dir", str(tmp_path / "dev"), "run", "--devices", "60",
                    "--shard", f"{k}/2", "--scenario", str(SMOKE),
                    "--report", str(tmp_path / f"r{k}.json"),
                    "--broker", broker.url, "--ca", str(pki.ca_cert),
                    "--cert", str(ident.cert), "--key", str(ident.key),
                    "--timeline", str(timeline), "--received", str(received),
                ]
            )  # fmt: skip
            assert rc == 0, capsys.readouterr()
            assert json.loads((tmp_path / f"r{k}.json").read_text())["devices"] == 30
            files["--timeline"].append(str(timeline))
            files["--capture"].append(str(received))
    capsys.readouterr()
    both = [a for opt, paths in files.items() for p in paths for a in (opt, p)]
    assert main(["check", *both]) == 0
    out = capsys.readouterr().out
    assert "from 60 devices" in out
    assert "violations  none" in out
    # Judged without the second shard's capture, its devices' items are missing.
    only_first = ["--timeline", *files["--timeline"][:1], "--timeline", files["--timeline"][1]]
    rc = main(["check", *only_first, "--capture", files["--capture"][0]])
    assert rc == 1
    assert "lost" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "3/2"], "--shard 3/2: K must be 1 to N"),
        (["--shard", "one"], "--shard 'one': give K/N"),
        (["--workers", "2", "--shard", "1/2"], "give one of them"),
        (["--workers", "17"], "--workers must be 1 to 16"),
        (["--fallback", "mqtts://127.0.0.1:1"], "--fallback and --jetstream go with --broker"),
        (["--jetstream", "tls://127.0.0.1:1"], "--fallback and --jetstream go with --broker"),
        (
            ["--broker", "mqtts://127.0.0.1:1", "--jetstream", "nats://127.0.0.1:2"],
            "--jetstream nats://127.0.0.1:2: give a node's NATS port as tls://HOST:PORT",
        ),
    ],
)
def test_bad_shard_arguments_get_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rc = main(
        [
            "--dir", str(tmp_path / "dev"), "run", "--devices", "4", *args,
            "--scenario", str(SMOKE), "--report", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err
    assert "Traceback" not in err


def test_the_runs_directory_keeps_the_last_few(tmp_path: Path) -> None:
    from simulator.outputs import KEEP_RUNS, new_run_dir

    made = []
    for n in range(KEEP_RUNS + 3):
        made.append(new_run_dir(tmp_path, f"s{n}"))
        (made[-1] / "fleet.db").write_text("x")
    left = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(left) == KEEP_RUNS
    assert made[-1].exists()
    assert not made[0].exists()
    new_run_dir(tmp_path, "shard", prune=False)  # a shard leaves its siblings alone
    assert len(list((tmp_path / "runs").iterdir())) == KEEP_RUNS + 1


@pytest.mark.asyncio
async def test_a_shards_consumer_is_sent_only_its_own_devices_uplink(
    broker: MosquittoBroker, pki: DevPki
) -> None:
    """On a broker with clean sessions, each consumer subscribes per device: the broker
    does not send every uplink once per shard."""
    ours, theirs = "shard-own-1", "shard-other-1"
    pki.ensure_devices([ours, theirs])
    ident = pki.backend_consumer(1)
    cloud = Cloud(
        broker.host,
        broker.port,
        pki,
        tls=client_context(pki.ca_cert, ident.cert, ident.key),
        client_id=backend_id(1),
    )
    cloud.devices = frozenset({ours})
    assert cloud.up_filters() == [up_filter(ours)]
    async with cloud.connected():
        # Ours is the marker. Two publishers and two topics, so MQTT promises no order
        # (v5 §4.6); the bound is causal: theirs was acknowledged before ours was
        # published, and Mosquitto queues a QoS 1 message for every matching
        # subscription before its PUBACK. Sent to us, theirs would arrive first.
        for device in (theirs, ours):
            await asyncio.to_thread(publish_as, broker, pki, device)
        async with asyncio.timeout(10):
            await cloud.wait_for(lambda got: any(r.device_id == ours for r in got))
    assert cloud.delivered_to_us == 1
    assert [r.device_id for r in cloud.received] == [ours]


def publish_as(broker: MosquittoBroker, pki: DevPki, device_id: str) -> None:
    client = PahoClient(broker, pki.ca_cert, pki.device(device_id), device_id)
    client.connect()
    client.publish(f"smartmi/v1/{device_id}/up/crash", b'{"msg_id": "m"}')
    client.close()


@pytest.mark.slow
def test_sigterm_stops_the_workers_and_the_broker_and_judges_what_arrived(
    tmp_path: Path,
) -> None:
    """``kill`` (SIGTERM) on ``smartmi-sim run --workers``, as a CI time limit sends it:
    the run ends like a Ctrl-C, with a report marked incomplete and no worker or broker
    left running without it."""
    import signal

    report = tmp_path / "r.json"
    below: set[int] = set()

    def note_children(pid: int) -> None:
        below.update(descendants(pid))
        assert len(below) >= 3  # two workers and the broker

    args = [
        "--dir", str(tmp_path / "dev"), "run", "--devices", "40", "--workers", "2",
        "--scenario", "consent-churn", "--report", str(report),
    ]  # fmt: skip
    rc, out, err = interrupted_run(
        args,
        after=b"workers running",  # both shards started, 16 s to play
        sig=signal.SIGTERM,
        within_s=90,
        before_signal=note_children,
    )
    assert rc == 130
    assert b"Traceback" not in err
    assert b"interrupted; stopping the workers" in err
    assert b"INCOMPLETE" in out
    assert [pid for pid in below if alive(pid)] == []
    doc = json.loads(report.read_text())
    assert doc["complete"] is False
    assert doc["shards"] == 2


def test_a_run_stopped_while_connecting_reports_how_many_had_connected(
    tmp_path: Path,
) -> None:
    """Ctrl-C (or SIGTERM) before every device has connected: the report gives how
    many had, the memory at that point, and no connect time; merged shards too."""
    import time

    from simulator import report
    from simulator.checker import check
    from simulator.fleet import Fleet, FleetBroker
    from simulator.scenario import load_scenario

    fleet = Fleet(
        load_scenario(SMOKE),
        20,
        workdir=tmp_path / "run",
        pki=DevPki(tmp_path / "pki").ensure(),
        broker=FleetBroker("127.0.0.1", 1),
        progress=False,
    )
    # As run() leaves them when stopped while connecting.
    fleet.stats.rss_baseline_kib = 1024
    fleet.stats.started_at = time.time() - 3
    fleet.stats.samples.append((time.time(), 7, 0, 0))  # the sampler's last second
    fleet.interrupted()
    doc = report.build(fleet, check({}, []))
    assert doc["complete"] is False
    assert doc["connect"]["connected"] == 7
    assert doc["connect"]["seconds"] is None
    assert doc["memory"]["rss_fleet_kib"] > doc["memory"]["rss_baseline_kib"]
    both = report.merged([doc, doc], check({}, []))
    assert both["connect"]["connected"] == 14
    assert both["connect"]["seconds"] is None
    assert both["complete"] is False
    for one in (doc, both):  # what a person reads says so, and never "None"
        text = report.summary(one)
        assert "None" not in text
        assert "stopped before every device had connected: no connect rate" in text
        assert "latency     none measured" in text
