"""Fleet and daemon benchmarks against a Mosquitto of their own, with same-run ceilings.

Ceilings, measured in the same run on the same broker:

* connect rate: six ``openssl s_time -new`` processes in parallel, each doing full
  mutual-TLS handshakes with a device certificate for 5 s; their connections over
  those 5 s of wall time (``s_time_ceiling``);
* throughput: one bare paho client publishing QoS 1 in a loop (20 in flight).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.purposes import Purpose
from agent.device import CrashReport
from agent.runtime.tls import client_context
from bench import cpu_seconds
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


def s_time_ceiling(
    broker: MosquittoBroker, pki: DevPki, seconds: int = 5, procs: int = 6
) -> dict[str, float]:
    """Mutual-TLS handshakes per second of wall time from ``procs`` parallel
    ``openssl s_time -new`` (``per_s``), and the figure used before (``per_user_s``).

    ``per_s`` is every connection made over the ``seconds`` each process runs at least,
    so if anything it is high. ``per_user_s`` sums each process's "connections/user
    sec": handshakes per second of its own user CPU time. That is a cost, not a rate
    the machine reaches: it leaves out the kernel's and the broker's share and grows with
    the number of processes (on 2 cores, 966/s with one, 5,323/s with six, while the
    wall rate went from 381/s to 684/s).
    """
    ident = pki.ensure_devices(["bench-s-time"])["bench-s-time"]
    cmd = [
        "openssl", "s_time", "-connect", f"{broker.host}:{broker.port}", "-new",
        "-time", str(seconds), "-cert", str(ident.cert), "-key", str(ident.key),
        "-CAfile", str(pki.ca_cert),
    ]  # fmt: skip
    runs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(procs)
    ]
    connections, per_user_s = 0, 0.0
    for proc in runs:
        out, _ = proc.communicate(timeout=seconds + 30)
        m = re.search(r"(\d+) connections in ([\d.]+)s", out)
        if m is None:
            raise RuntimeError(f"openssl s_time printed no rate:\n{out[-500:]}")
        connections += int(m.group(1))
        per_user_s += int(m.group(1)) / float(m.group(2))
    return {"per_s": connections / seconds, "per_user_s": per_user_s}


def paho_ceiling(broker: MosquittoBroker, pki: DevPki, seconds: float = 5.0) -> float:
    """QoS 1 PUBLISH+PUBACK per second from one bare paho client, 20 in flight."""
    device = "bench-paho"
    ident = pki.ensure_devices([device])[device]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    client.tls_set_context(client_context(pki.ca_cert, ident.cert, ident.key))
    client.max_inflight_messages_set(20)
    slots = threading.Semaphore(20)
    acked = [0]
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()

    def on_publish(*_a: Any) -> None:
        acked[0] += 1
        slots.release()

    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("the paho ceiling client did not connect")
    payload = os.urandom(600)
    topic = f"smartmi/v1/{device}/up/crash"
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        slots.acquire()
        client.publish(topic, payload, qos=1)
    took = time.perf_counter() - t0
    rate = acked[0] / took
    client.disconnect()
    client.loop_stop()
    return rate


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
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        # Keep about 5 items per device queued: the pipeline, not the producer, limits.
        with fleet.store.db.transaction():  # type: ignore[union-attr]
            for _ in range(200):
                d = devs[i % n]
                i += 1
                if d.core.queued_count() < 5:
                    d.core.capture_crash(CRASH, now=time.time())
        await asyncio.sleep(0)
    took = time.monotonic() - t0
    acked = sum(d.transport.stats.acknowledged for d in devs) - acked0
    await fleet.stop()
    assert fleet.store is not None  # noqa: S101
    fleet.store.db.close()
    return {"devices": n, "seconds": took, "msgs_per_s": acked / took}


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


def run_all(
    devices: int,
    throughput_devices: int,
    throughput_s: float,
    idle_s: float,
    *,
    cluster_devices: int = 0,
    cluster_limit_s: float = 1800.0,
) -> dict[str, Any]:
    """Every fleet and daemon benchmark with its ceilings, on one broker of their own."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pki = DevPki(root / "pki").ensure()
        with MosquittoBroker(pki) as broker:
            out: dict[str, Any] = {}
            s_time = s_time_ceiling(broker, pki)
            out["s_time_per_s"] = s_time["per_s"]
            out["s_time_per_user_s"] = s_time["per_user_s"]
            out["paho_msgs_per_s"] = paho_ceiling(broker, pki)
            out["fleet"] = asyncio.run(fleet_start_and_storm(devices, broker, pki, root / "fleet"))
            out["throughput"] = asyncio.run(
                throughput(throughput_devices, throughput_s, broker, pki, root / "tp")
            )
            out["daemon"] = daemon(broker, pki, root, idle_s)
        workers = os.cpu_count() or 1
        out["sharded"] = [workers_start(devices, n, root) for n in sorted({1, workers})]
        if cluster_devices:
            # A process may hold 20,000 open files here, and each agent holds a socket.
            shards = max(workers, -(-cluster_devices // AGENTS_PER_WORKER))
            out["cluster"] = workers_start(
                cluster_devices, shards, root, cluster=3, limit_s=cluster_limit_s
            )
    return out
