"""Fleet and daemon benchmarks against a Mosquitto of their own, each with the ceiling
of ``bench.ceilings`` measured in the same run on the same broker."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.core.ledger import sent_entry
from agent.core.purposes import Purpose
from agent.device import CrashReport
from agent.runtime.transport import Transport
from bench import ceilings, core, cpu_seconds, progress
from simulator.broker import MosquittoBroker, memory_kib
from simulator.fleet import Fleet, FleetBroker
from simulator.pki import DevPki
from simulator.sampling import rss_kib
from simulator.scenario import Scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "simulator" / "scenarios"

AGENTS_PER_WORKER = 15_000  # the most one cluster worker takes (its open files)

CRASH = CrashReport(
    "SIGSEGV in bench", "Traceback (most recent call last):\n  File x", uptime_s=1.0
)
# PUBLISHes a connection has awaiting their PUBACK: the agent's, for its ceilings too.
WINDOW: int = inspect.signature(Transport).parameters["window"].default


def item_sizes(root: Path) -> tuple[int, int]:
    """The bytes an agent publishes for ``CRASH``, and the JSON of its "sent" ledger
    entry: what the same-work ceiling seals, stores and publishes per message."""
    device = core.device(root, "NORMAL")
    msg_id = device.capture_crash(CRASH, now=1e9)
    item = device.store.queued(1)[0]
    entry = sent_entry(msg_id, item.purpose.value, item.payload, now=1e9)
    device.store.db.close()
    return len(item.payload), len(json.dumps(entry, sort_keys=True))


def _fleet(n: int, broker: MosquittoBroker, pki: DevPki, workdir: Path) -> Fleet:
    scenario = Scenario.model_validate(
        {"name": "bench", "duration_s": 1, "groups": [{"name": "bench", "share": 1.0}]}
    )
    return Fleet(
        scenario,
        n,
        workdir=workdir,
        pki=pki,
        broker=FleetBroker(broker.host, broker.port, restart=broker.restart),
        progress=False,
    )


async def _built(fleet: Fleet, *purposes: Purpose) -> list[Any]:
    """Build the fleet; every device bound and ``purposes`` granted, before connecting
    (so what they allow waits in each: an activation, or room for crashes)."""
    store = await fleet.build()
    devs = list(fleet.devices.values())
    now = time.time()
    with store.db.transaction():
        for d in devs:
            d.core.bind(f"{d.device_id}-b", now=now)
            for purpose in purposes:
                d.core.grant(purpose, now=now)
    return devs


async def _until(predicate: Any, limit_s: float, step: float = 0.05) -> float:
    """Poll a condition (benchmarks measure, they do not assert); returns the wait."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > limit_s:
            raise TimeoutError
        await asyncio.sleep(step)
    return time.monotonic() - t0


async def fleet_start_and_storm(
    n: int, broker: MosquittoBroker, pki: DevPki, workdir: Path
) -> dict[str, Any]:
    """N agents connect, each with its activation acknowledged; then a broker restart."""
    fleet = _fleet(n, broker, pki, workdir)
    baseline = rss_kib()
    devs = await _built(fleet, Purpose.ACTIVATION, Purpose.DIAGNOSTICS)
    async with fleet.cloud.connected():  # answers the command syncs (SPEC §3)
        return await _start_and_storm(fleet, devs, broker, baseline)


async def _start_and_storm(
    fleet: Fleet, devs: list[Any], broker: MosquittoBroker, baseline: int
) -> dict[str, Any]:
    n = len(devs)
    fleet.start()
    start_s = await _until(lambda: all(len(d.truth.acked) >= 1 for d in devs), 900)
    rss = rss_kib()
    # Reconnect storm: one pending item per device, then the broker restarts.
    with fleet.store.db.transaction():  # type: ignore[union-attr]
        pending = {d.device_id: d.core.capture_crash(CRASH, now=time.time()) for d in devs}
    attempts_before = sum(d.transport.stats.attempts for d in devs)
    await asyncio.to_thread(broker.restart)
    t_restart = time.monotonic()
    per_second: list[int] = []
    last = attempts_before
    back = False
    while time.monotonic() - t_restart < 120:
        await asyncio.sleep(1.0)
        total = sum(d.transport.stats.attempts for d in devs)
        per_second.append(total - last)
        last = total
        if all(d.transport.connected.is_set() and d.transport.idle.is_set() for d in devs):
            back = True
            break
    storm_s = time.monotonic() - t_restart
    lost = [m for dev_id, m in pending.items() if m not in fleet.devices[dev_id].truth.acked]
    await fleet.stop()
    assert fleet.store is not None  # noqa: S101
    fleet.store.db.close()
    return {
        "devices": n,
        "start_s": start_s,
        "devices_per_s": n / start_s,
        "rss_per_device_kib": (rss - baseline) / n,
        "storm_all_back_s": storm_s if back else None,
        "storm_max_attempts_per_s": max(per_second or [0]),
        "storm_pending_lost": len(lost),
    }


async def throughput(
    n: int, seconds: float, broker: MosquittoBroker, pki: DevPki, workdir: Path
) -> dict[str, Any]:
    """Captured → gated → sealed → stored → published → acknowledged → ledgered, sustained."""
    fleet = _fleet(n, broker, pki, workdir)
    devs = await _built(fleet, Purpose.DIAGNOSTICS)
    async with fleet.cloud.connected():  # answers the command syncs (SPEC §3)
        return await _sustain(fleet, devs, seconds)


async def _sustain(fleet: Fleet, devs: list[Any], seconds: float) -> dict[str, Any]:
    n = len(devs)
    fleet.start()
    await _until(lambda: all(d.transport.synced.is_set() for d in devs), 300)
    acked0 = sum(d.transport.stats.acknowledged for d in devs)
    t0, cpu0 = time.monotonic(), time.process_time()
    i = captured = 0
    capture_s = 0.0  # the producer's share: capture (gate, scrub, schema, seal, insert)
    while time.monotonic() - t0 < seconds:
        # Keep about 5 items per device queued: the pipeline, not the producer, limits.
        c0 = time.perf_counter()
        with fleet.store.db.transaction():  # type: ignore[union-attr]
            for _ in range(200):
                d = devs[i % n]
                i += 1
                if d.core.queued_count() < 5:
                    d.core.capture_crash(CRASH, now=time.time())
                    captured += 1
        capture_s += time.perf_counter() - c0
        await asyncio.sleep(0)
    took, cpu = time.monotonic() - t0, time.process_time() - cpu0
    acked = sum(d.transport.stats.acknowledged for d in devs) - acked0
    await fleet.stop()
    assert fleet.store is not None  # noqa: S101
    fleet.store.db.close()
    return {
        "devices": n,
        "seconds": took,
        "msgs_per_s": acked / took,
        # The whole process's CPU (every agent, and the simulated cloud receiving each
        # message) per acknowledged message, and the producer's share of it.
        "cpu_us_per_msg": 1e6 * cpu / max(1, acked),
        "capture_us_per_msg": 1e6 * capture_s / max(1, captured),
    }


def daemon(
    broker: MosquittoBroker, pki: DevPki, workdir: Path, idle_s: float = 60.0
) -> dict[str, Any]:
    """The daemon of one device: resident memory, start to connected, idle CPU."""
    ident = pki.ensure_devices(["bench-daemon"])["bench-daemon"]
    conf = workdir / "agent.toml"
    conf.write_text(
        f'[device]\nid = "bench-daemon"\nserial = "S"\nmodel = "m"\nfirmware_version = "1"\n'
        f'[privacy]\npolicy_version = "1"\n[paths]\nstate_dir = "state"\n'
        f'[broker]\nurl = "{broker.url}"\nca = "{pki.ca_cert}"\n'
        f'cert = "{ident.cert}"\nkey = "{ident.key}"\n'
    )
    exe = Path(sys.executable).parent / "smartmi-agent"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(exe), "--config", str(conf), "run"], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None  # noqa: S101
    for line in proc.stderr:
        if json.loads(line).get("msg") == "connected":
            break
    start = time.monotonic() - t0

    stat = Path(f"/proc/{proc.pid}/stat")
    c0, w0 = cpu_seconds(stat), time.monotonic()
    time.sleep(idle_s)
    c1, w1 = cpu_seconds(stat), time.monotonic()
    resident = memory_kib(proc.pid)
    proc.terminate()
    proc.wait(timeout=30)
    return {
        "rss_mb": resident / 1024,
        "start_to_connected_s": start,
        "idle_cpu_pct": 100 * (c1 - c0) / (w1 - w0),
    }


def workers_start(
    devices: int, workers: int, root: Path, *, cluster: int = 0, limit_s: float = 1800.0
) -> dict[str, Any]:
    """``smartmi-sim run --workers N`` on the smoke scenario (with ``cluster``, against a
    local NATS cluster of that many nodes): the merged report's connect rate (devices
    over the slowest shard's time to all connected), memory of the fleet and of the
    broker, violations, and the wall time. A run past ``limit_s`` is stopped with
    SIGTERM, which judges what arrived (its report says incomplete)."""
    out = root / f"workers-{workers}-cluster-{cluster}.json"
    cmd = [
        sys.executable, "-m", "simulator.cli", "--dir", str(root / f"dev-{cluster}"), "run",
        "--devices", str(devices), "--scenario", str(SCENARIOS / "smoke.toml"),
        "--report", str(out), "--grace", "10",
    ]  # fmt: skip
    if workers > 1:
        cmd += ["--workers", str(workers)]
    if cluster:
        cmd += ["--cluster", str(cluster)]
    t0 = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            _, err = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # as Ctrl-C: the workers stop and what arrived is judged
            try:
                _, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:  # it did not stop: no report, said below
                proc.kill()
                _, err = proc.communicate()
    wall = time.monotonic() - t0
    if not out.exists():
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "no report"
        return {"workers": workers, "cluster": cluster, "error": f"failed: {last}"}
    doc = json.loads(out.read_text())
    memory = doc["memory"]
    return {
        "workers": workers,
        "cluster": cluster,
        "devices": doc["devices"],
        "connected": doc["connect"]["connected"],
        "connect_s": doc["connect"]["seconds"],
        "devices_per_s": doc["connect"]["devices_per_s"] or 0.0,
        "per_device_kib": memory["per_device_kib"],
        "fleet_mib": (memory["rss_fleet_kib"] - memory["rss_baseline_kib"]) / 1024,
        "broker_peak_mib": memory.get("broker_peak_kib", 0) / 1024,
        "violations": len(doc["violations"]),
        "violation_counts": {k: v for k, v in doc["violation_counts"].items() if v},
        "complete": doc.get("complete", True),
        "drained": doc["delivery"]["drained"],
        "wall_s": wall,
    }


def throughput_with_ceilings(
    n: int, seconds: float, broker: MosquittoBroker, pki: DevPki, root: Path, *, ceiling_s: float
) -> dict[str, Any]:
    """The agent's throughput between two runs of each ceiling (bare paho, then the same
    work), so that a change in the machine's load shows; each ceiling's better run counts.
    """
    payload_bytes, ledger_bytes = item_sizes(root / "sizes")
    payload = os.urandom(payload_bytes)
    runs: dict[str, list[dict[str, float]]] = {"paho": [], "same_work": []}
    sinks: list[float] = []  # the backend sink's CPU per message, by pair of runs

    def ceiling_runs(when: str) -> None:
        progress.step(f"throughput ceilings, {when} the agent's: bare paho, then the same work")
        work = ceilings.SameWork(root / f"same-work-{when}.db", payload, ledger_bytes)
        with ceilings.backend_sink(broker, pki) as sink:
            for key, store in (("paho", None), ("same_work", work)):
                runs[key].append(
                    ceilings.qos1_ceiling(
                        broker, pki, window=WINDOW, payload=payload, seconds=ceiling_s, work=store
                    )
                )
        sinks.append(1e6 * sink["cpu_s"] / max(1, sink["messages"]))

    ceiling_runs("before")
    progress.step(f"throughput, {n:,} agents for {seconds:.0f} s")
    out = asyncio.run(throughput(n, seconds, broker, pki, root / "tp"))
    ceiling_runs("after")
    return {
        **out,
        "window": WINDOW,
        "payload_bytes": payload_bytes,
        "ledger_entry_bytes": ledger_bytes,
        "paho_runs": runs["paho"],
        "paho_msgs_per_s": max(r["msgs_per_s"] for r in runs["paho"]),
        "same_work_runs": runs["same_work"],
        "same_work_msgs_per_s": max(r["msgs_per_s"] for r in runs["same_work"]),
        "sink_cpu_us_per_msg": sinks,
    }


def run_all(
    devices: int,
    throughput_devices: int,
    throughput_s: float,
    idle_s: float,
    *,
    ceiling_s: float,
    workers_devices: int,
    one_workers_run: bool = False,
    cluster_devices: int = 0,
    cluster_limit_s: float = 1800.0,
) -> dict[str, Any]:
    """Every fleet and daemon benchmark with its ceilings, on one broker of their own;
    ``smartmi-sim run`` with ``--workers 1`` and one per core (only the latter with
    ``one_workers_run``)."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pki = DevPki(root / "pki").ensure()
        with MosquittoBroker(pki) as broker:
            out: dict[str, Any] = {}
            progress.step("connect-rate ceiling: openssl s_time")
            s_time = ceilings.s_time_ceiling(broker, pki)
            out["s_time_per_s"] = s_time["per_s"]
            out["s_time_per_user_s"] = s_time["per_user_s"]
            progress.step("memory floor: mutual-TLS connections, each with its own context")
            out["tls_floor_kib"] = ceilings.tls_memory_floor(broker, pki)
            progress.step(f"fleet start and reconnect storm, {devices:,} agents")
            out["fleet"] = asyncio.run(fleet_start_and_storm(devices, broker, pki, root / "fleet"))
            out["throughput"] = throughput_with_ceilings(
                throughput_devices, throughput_s, broker, pki, root, ceiling_s=ceiling_s
            )
            progress.step("daemon floor: a bare paho client process")
            out["bare_daemon"] = ceilings.bare_daemon(broker, pki)
            progress.step(f"agent daemon, then {idle_s:.0f} s idle")
            out["daemon"] = daemon(broker, pki, root, idle_s)
        workers = os.cpu_count() or 1
        out["sharded"] = []
        for n in sorted({workers} if one_workers_run else {1, workers}):
            progress.step(f"smartmi-sim run --workers {n}, {workers_devices:,} agents")
            out["sharded"].append(workers_start(workers_devices, n, root))
        if cluster_devices:
            # A process may hold 20,000 open files here, and each agent holds a socket.
            shards = max(workers, -(-cluster_devices // AGENTS_PER_WORKER))
            progress.step(f"3-node NATS cluster, {cluster_devices:,} agents, --workers {shards}")
            out["cluster"] = workers_start(
                cluster_devices, shards, root, cluster=3, limit_s=cluster_limit_s
            )
    return out
