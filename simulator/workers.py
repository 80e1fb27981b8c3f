"""``smartmi-sim run --workers N``: N shard processes against one local broker, and
one checker over their timelines, captures and reports (``smartmi-sim check`` too)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from agent.errors import ConfigError
from agent.runtime import metrics
from simulator import report, timeline
from simulator.broker import LocalBroker, MosquittoBroker
from simulator.checker import check
from simulator.cloud import Received
from simulator.devices import scenario_devices
from simulator.nats import NatsCluster
from simulator.outputs import INTERRUPTED, NO_VERDICT, Outputs, new_run_dir, outcome
from simulator.pki import DevPki
from simulator.scenario import Scenario
from simulator.truth import DeviceTruth

SHARD_STOP_S: Final = 60.0  # how long an interrupted worker may take to write what it has


def run_workers(
    *,
    devices: int,
    scenario: Scenario,
    scenario_path: Path,
    dev_dir: Path,
    outputs: Outputs,
    seed: int | None,
    grace_s: float | None,
    cluster: int,
    workers: int,
) -> int:
    """N shard processes against one local broker; one checker over all of them."""
    if scenario.restarts_broker:
        raise ConfigError(
            "the scenario restarts the broker, which only a single process can do: run it "
            "without --workers",
            where=str(scenario_path),
        )
    if outputs.capture is not None:
        raise ConfigError("--capture goes with a single process: run it without --workers")
    if devices < workers:
        raise ConfigError(f"--workers {workers} needs at least {workers} devices")
    pki = DevPki(dev_dir / "pki").ensure()
    workdir = new_run_dir(dev_dir, f"{scenario.name}-workers")
    local: LocalBroker = NatsCluster(pki, nodes=cluster) if cluster else MosquittoBroker(pki)
    with local:
        local.start()
        # Every device's identity and broker entry before any worker starts.
        ids = [d for _, d in scenario_devices(scenario, devices)]
        pki.ensure_devices(ids)
        local.authorize(ids)
        what = f"a {cluster}-node NATS cluster" if cluster else "Mosquitto"
        print(f"started {what} on {local.url}; {workers} workers", file=sys.stderr)
        procs = [
            _spawn_shard(
                k,
                workers,
                local=local,
                pki=pki,
                devices=devices,
                scenario_path=scenario_path,
                dev_dir=dev_dir,
                workdir=workdir,
                seed=seed,
                grace_s=grace_s,
            )
            for k in range(1, workers + 1)
        ]
        interrupted = False
        try:
            _wait_for_shards(procs, workdir)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cmd_run maps it to the same)
            interrupted = True
            print(
                "smartmi-sim: interrupted; stopping the workers, then judging what arrived so far",
                file=sys.stderr,
                flush=True,
            )
            _interrupt_shards(procs)
        broker_peak_kib = local.peak_rss_kib()
    done = (0, 1, NO_VERDICT, INTERRUPTED) if interrupted else (0, 1, NO_VERDICT)
    failed = [k for k, p in enumerate(procs, 1) if p.returncode not in done]
    if failed:
        logs = ", ".join(str(workdir / f"shard{k}.log") for k in failed)
        raise ConfigError(f"worker(s) {failed} failed; their logs: {logs}")
    if outputs.metrics is not None:
        metrics.merge_files(
            [workdir / f"shard{k}.prom" for k in range(1, workers + 1)], outputs.metrics
        )
    rc = judge_shards(
        [workdir / f"shard{k}.timeline.json" for k in range(1, workers + 1)],
        [workdir / f"shard{k}.received.txt" for k in range(1, workers + 1)],
        [workdir / f"shard{k}.json" for k in range(1, workers + 1)],
        outputs,
        broker_peak_kib=broker_peak_kib,
    )
    return INTERRUPTED if interrupted else rc


def _wait_for_shards(procs: list[subprocess.Popen[bytes]], workdir: Path) -> None:
    """Wait for every shard to end, with a progress line every 5 s."""
    started = time.monotonic()
    shown = started
    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
        if time.monotonic() - shown >= 5:
            shown = time.monotonic()
            running = sum(p.poll() is None for p in procs)
            print(
                f"[{shown - started:6.1f}s] workers running {running}/{len(procs)} "
                f"(each one's progress: {workdir}/shard*.log)",
                file=sys.stderr,
                flush=True,
            )


def _interrupt_shards(procs: list[subprocess.Popen[bytes]], wait_s: float = SHARD_STOP_S) -> None:
    """Interrupt every shard still running, as Ctrl-C would: each stops its devices and
    writes what it has (its report is marked incomplete). One that has not ended within
    ``wait_s`` is killed, so no worker outlives the run (nor the broker it uses)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + wait_s
    try:
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
    finally:  # also when a second Ctrl-C cuts the wait short
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _spawn_shard(
    k: int,
    n: int,
    *,
    local: LocalBroker,
    pki: DevPki,
    devices: int,
    scenario_path: Path,
    dev_dir: Path,
    workdir: Path,
    seed: int | None,
    grace_s: float | None,
) -> subprocess.Popen[bytes]:
    """Start ``smartmi-sim run --shard K/N`` against ``local`` as backend consumer K."""
    ident = pki.backend_consumer(k)
    host = local.host
    cmd = [
        sys.executable, "-m", "simulator.cli", "--dir", str(dev_dir), "run",
        "--devices", str(devices), "--scenario", str(scenario_path), "--shard", f"{k}/{n}",
        "--broker", local.url, "--protocol", local.protocol,
        "--ca", str(pki.ca_cert), "--cert", str(ident.cert), "--key", str(ident.key),
        "--report", str(workdir / f"shard{k}.json"),
        "--timeline", str(workdir / f"shard{k}.timeline.json"),
        "--received", str(workdir / f"shard{k}.received.txt"),
        "--metrics", str(workdir / f"shard{k}.prom"),
    ]  # fmt: skip
    for port in local.ports[1:]:
        cmd += ["--fallback", f"mqtts://{host}:{port}"]
    for url in local.jetstream.urls if local.jetstream else ():
        cmd += ["--jetstream", url]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if grace_s is not None:
        cmd += ["--grace", str(grace_s)]
    log = (workdir / f"shard{k}.log").open("wb")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def read_shards(
    timelines: list[Path], captures: list[Path]
) -> tuple[dict[str, DeviceTruth], list[tuple[float, float]], list[Received]]:
    """The timelines and captures of one fleet's shards, merged: every device's truth
    (a device in two timelines is an error; a capture's command deliveries added to
    it), the broker outages in order, and every message received."""
    truths: dict[str, DeviceTruth] = {}
    outages: list[tuple[float, float]] = []
    for path in timelines:
        t, o = timeline.read(path)
        if set(t) & set(truths):
            raise ConfigError("a device appears in two timelines", where=str(path))
        truths.update(t)
        outages.extend(o)
    received: list[Received] = []
    for path in captures:
        capture = timeline.read_capture(path)
        capture.note_in(truths)
        received += capture.received
    return truths, sorted(outages), received


def judge_shards(
    timelines: list[Path],
    captures: list[Path],
    reports: list[Path],
    outputs: Outputs,
    *,
    broker_peak_kib: int = 0,
) -> int:
    """Judge the shards of one fleet together: their timelines, what their backend
    consumers received, and their reports, merged into one report (with the peak
    memory of the broker they shared, when this process started it)."""
    truths, outages, received = read_shards(timelines, captures)
    docs = []
    for path in reports:
        try:
            docs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read a shard's report: {exc}", where=str(path)) from exc
    verdict = check(truths, received, outages=outages)
    doc = report.merged(docs, verdict, broker_peak_kib=broker_peak_kib)
    outputs.write(doc, received, verdict, truths)
    if outputs.timeline is not None:
        timeline.write(outputs.timeline, truths, outages)
    print(report.summary(doc))
    print(outputs.written())
    return outcome(doc, len(verdict.violations))
