"""``smartmi-sim run``: a fleet against a broker, the checker's verdict, the report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from agent.config import mqtts_host_port
from agent.core.identity import MAX_BACKENDS, up_topic
from agent.errors import ConfigError, TransportError
from agent.runtime import metrics, mqtt
from agent.runtime.tls import client_context
from simulator import html, report, story, timeline
from simulator.broker import LocalBroker, MosquittoBroker
from simulator.checker import DeviceTruth, Verdict, check
from simulator.cloud import Received
from simulator.fleet import Fleet, scenario_devices
from simulator.jetstream import JetStreamAt
from simulator.nats import NatsCluster
from simulator.pki import DevPki
from simulator.scenario import Scenario, load_scenario

# A device identity whose command syncs show that the observer's capture is live.
OBSERVER_PROBE: Final = "sim-observer-probe"


@dataclass(frozen=True)
class Outputs:
    """Where a run writes what it found."""

    report: Path
    junit: Path | None = None
    timeline: Path | None = None
    capture: Path | None = None
    received: Path | None = None  # what the backend consumer received, as a capture
    metrics: Path | None = None  # the agents' metrics at the end, Prometheus text format
    html: Path | None = None  # the report as one self-contained page

    def check(self) -> None:
        """Every output can be written: found before the run, not after it."""
        for option, path in (
            ("--report", self.report),
            ("--junit", self.junit),
            ("--timeline", self.timeline),
            ("--capture", self.capture),
            ("--received", self.received),
            ("--metrics", self.metrics),
            ("--html", self.html),
        ):
            if path is None:
                continue
            folder = path.parent
            if path.is_dir():
                raise ConfigError(f"{option} {path} is a directory; name a file in it")
            if not folder.is_dir():
                raise ConfigError(f"{option} {path}: the folder {folder} does not exist")
            if not os.access(folder, os.W_OK):
                raise ConfigError(f"{option} {path}: the folder {folder} is not writable")
        if self.html is not None:
            html.available()

    def write(
        self,
        doc: dict[str, Any],
        received: list[Received],
        verdict: Verdict,
        truths: dict[str, DeviceTruth],
    ) -> None:
        """The report, and the JUnit file and page if asked for (the page with the
        story of each of the first devices with a violation)."""
        report.write_json(doc, self.report)
        if self.junit is not None:
            report.write_junit(doc, self.junit)
        if self.html is not None:
            told = story.stories(truths, received, doc["violations"])
            html.write(doc, received, verdict.latencies_s, self.html, told)

    def written(self) -> str:
        """The line that says where they went."""
        extra = [f"{k}: {p}" for k, p in (("JUnit", self.junit), ("page", self.html)) if p]
        return f"report: {self.report}" + "".join(f", {e}" for e in extra)


@dataclass(frozen=True)
class ExternalBroker:
    """A broker the simulator did not start, and the backend's identity on it."""

    url: str
    ca: Path | None
    cert: Path | None
    key: Path | None
    protocol: Literal["v5", "v311"] = "v5"
    # Other nodes of a clustered broker on the same host (--fallback).
    fallbacks: tuple[str, ...] = ()
    # A NATS cluster's NATS ports (--jetstream): the backend reads the uplink there.
    jetstream: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for url in self.jetstream:  # wrong at once, before any identity is read
            if not url.startswith("tls://"):
                raise ConfigError(f"--jetstream {url}: give a node's NATS port as tls://HOST:PORT")
            _host_port("--jetstream", "mqtts://" + url.removeprefix("tls://"))

    def jetstream_at(self) -> JetStreamAt | None:
        """Where the backend reads the uplink, if not over MQTT."""
        return JetStreamAt(self.jetstream, min(len(self.jetstream), 3)) if self.jetstream else None

    def address(self) -> tuple[str, int, ssl.SSLContext]:
        """Host, port and the backend's TLS context; ConfigError on a bad URL or identity."""
        if not (self.ca and self.cert and self.key):
            raise ConfigError("--broker needs --ca, --cert and --key (the backend's identity)")
        host, port = _host_port("--broker", self.url)
        tls = client_context(self.ca, self.cert, self.key)
        _listening("--broker", host, port)
        return host, port, tls

    def ports(self) -> list[int]:
        """The broker's port, then each fallback's (all on the broker's host)."""
        host, port = _host_port("--broker", self.url)
        ports = [port]
        for url in self.fallbacks:
            other, p = _host_port("--fallback", url)
            if other != host:
                raise ConfigError(f"--fallback {url}: must be on the broker's host {host}")
            ports.append(p)
        return ports


PROBE_S: Final = 5.0  # how long --broker's address may take to accept a TCP connection


def _listening(option: str, host: str, port: int) -> None:
    """ConfigError at once, naming the address and the fix, unless something accepts a
    TCP connection there (the backend would otherwise retry for 30 s)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_S):
            return
    except ConnectionRefusedError:
        why = "nothing listens there (connection refused)"
    except TimeoutError:
        why = f"no answer within {PROBE_S:g} s (a firewall, or the wrong host)"
    except OSError as exc:
        why = exc.strerror or str(exc)
    raise ConfigError(
        f"{option}: cannot reach {host}:{port}: {why}. Start a broker there (for a local "
        "one: smartmi-sim broker up) or give the address it listens on"
    )


def _host_port(option: str, url: str) -> tuple[str, int]:
    try:
        return mqtts_host_port(url)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


INTERRUPTED: Final = 130  # 128 + SIGINT, as a shell reports a tool stopped by Ctrl-C
NO_VERDICT: Final = 3  # the fleet fell behind its schedule (simulator.fleet.MAX_LAG_S)
SHARD_STOP_S: Final = 60.0  # how long an interrupted worker may take to write what it has
KEEP_RUNS: Final = 5  # the runs directory keeps this many past runs' stores and logs


def new_run_dir(dev_dir: Path, name: str, *, prune: bool = True) -> Path:
    """A fresh directory under ``DIR/runs`` for one run; unless ``prune`` is off (a
    shard, whose siblings run beside it), the oldest beyond the last KEEP_RUNS are
    removed first, so the directory does not grow with every run."""
    runs = dev_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    past = sorted(
        (p for p in runs.iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime_ns, p.name)
    )
    for old in past[: max(0, len(past) - (KEEP_RUNS - 1))] if prune else ():
        shutil.rmtree(old, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = runs / f"{name}-{stamp}-{os.getpid()}"
    workdir.mkdir()
    return workdir


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N <= 16) as a pair; ConfigError otherwise."""
    k, _, n = text.partition("/")
    try:
        shard = int(k), int(n)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: give K/N, as 1/2 or 2/2") from None
    if not 1 <= shard[0] <= shard[1] <= MAX_BACKENDS:
        raise ConfigError(f"--shard {text}: K must be 1 to N, and N at most {MAX_BACKENDS}")
    return shard


def run(
    *,
    devices: int,
    scenario_path: Path,
    dev_dir: Path,
    outputs: Outputs,
    broker: ExternalBroker | None = None,
    seed: int | None = None,
    grace_s: float | None = None,
    cluster: int = 0,
    shard: tuple[int, int] = (1, 1),
    workers: int = 1,
) -> int:
    """Run the fleet; 0 only with zero violations (of the backend's and any capture's).

    With ``cluster`` N (and no external broker) the fleet runs against an N-node NATS
    cluster instead of one Mosquitto, its devices spread over the nodes. ``shard`` K/N
    plays only every Nth device, with backend consumer K. ``workers`` N runs the N
    shards as processes against one broker and judges them together.
    """
    if devices < 1:
        raise ConfigError("--devices must be at least 1")
    if grace_s is not None and not 0 <= grace_s <= 60:
        raise ConfigError(f"--grace must be 0 to 60 seconds, not {grace_s:g}")
    outputs.check()
    # Per-device connection chatter would drown the progress lines; the report has
    # the counts. Errors (certificate problems) still show.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    scenario = load_scenario(scenario_path)
    scenario.sizes(devices)  # too few devices for its groups: said before anything starts
    if not 1 <= workers <= MAX_BACKENDS:
        raise ConfigError(f"--workers must be 1 to {MAX_BACKENDS}, not {workers}")
    if workers > 1:
        return _run_workers(
            devices=devices,
            scenario=scenario,
            scenario_path=scenario_path,
            dev_dir=dev_dir,
            outputs=outputs,
            seed=seed,
            grace_s=grace_s,
            cluster=cluster,
            workers=workers,
        )
    if broker is not None and cluster:
        raise ConfigError("--cluster starts a local NATS cluster; it cannot go with --broker")
    if broker is not None and scenario.restarts_broker:
        raise ConfigError(
            "the scenario restarts the broker, which the simulator can do only to a broker "
            "it started: run it without --broker, or remove its broker-restart events",
            where=str(scenario_path),
        )
    pki = DevPki(dev_dir / "pki").ensure()
    workdir = new_run_dir(dev_dir, scenario.name, prune=shard[1] == 1)
    with contextlib.ExitStack() as stack:
        cloud_tls: ssl.SSLContext | None = None
        restart: Callable[[], object] | None = None
        observer_back: list[float] = []  # when the observer had subscribed again
        local: LocalBroker | None = None
        if broker is None:
            started: LocalBroker = (
                NatsCluster(pki, nodes=cluster) if cluster else MosquittoBroker(pki)
            )
            stack.callback(started.cleanup)
            local = started.start()
            host, port, restart = started.host, started.port, started.restart
            if isinstance(started, NatsCluster):
                restart = started.fail_one  # a node fails; the cluster goes on
            what = f"a {cluster}-node NATS cluster" if cluster else "Mosquitto"
            print(f"started {what} on {started.url} (log {started.log_path})", file=sys.stderr)
            if outputs.capture is not None:
                restart = _observed_restart(restart, started, pki, outputs.capture, observer_back)
        else:
            host, port, cloud_tls = broker.address()
        protocol = local.protocol if local is not None else broker.protocol if broker else "v5"
        if outputs.capture is not None:
            # An independent observer at the broker: judged apart from the backend.
            stack.enter_context(observe(host, port, pki, outputs.capture, protocol=protocol))
            if local is not None:
                local.authorize([OBSERVER_PROBE])
            asyncio.run(wait_observing(host, port, pki, outputs.capture, protocol=protocol))
        fleet = Fleet(
            scenario,
            devices,
            workdir=workdir,
            pki=pki,
            broker_host=host,
            broker_port=port,
            restart_broker=restart,
            cloud_tls=cloud_tls,
            seed=seed,
            grace_s=grace_s,
            protocol=protocol,
            ports=local.ports if local is not None else broker.ports() if broker else (),
            backend_persistent=local.backend_persistent
            if local is not None
            else protocol == "v311",  # a broker without MQTT 5: NATS keeps the session
            jetstream=_jetstream_of(local, broker),
            authorize=local.authorize if local is not None else None,
            shard=shard,
            broker_keeps_acknowledged=isinstance(local, NatsCluster),
        )
        fleet.observer_back = observer_back
        fleet.keep_status = outputs.metrics is not None
        _play(fleet, local)
    rc = _judge(fleet, outputs)
    return INTERRUPTED if fleet.was_interrupted else rc


def _jetstream_of(local: LocalBroker | None, broker: ExternalBroker | None) -> JetStreamAt | None:
    """Where the backend reads the uplink from JetStream, if it does (a NATS cluster)."""
    if local is not None:
        urls = tuple(local.jetstream_urls)
        return JetStreamAt(urls, local.replicas) if urls else None
    return broker.jetstream_at() if broker is not None else None


def _play(fleet: Fleet, local: LocalBroker | None) -> None:
    """Run the fleet; on Ctrl-C, stop it and keep what arrived for the checker. Then
    note the peak memory of the broker, if this process started it."""
    try:
        asyncio.run(_with_task_dump(fleet.run()))
    except KeyboardInterrupt:
        print("smartmi-sim: interrupted; judging what arrived so far", file=sys.stderr)
        fleet.interrupted()
    if local is not None:
        fleet.stats.broker_peak_kib = local.peak_rss_kib()


def _run_workers(
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
    for url in local.jetstream_urls:
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
    return _outcome(doc, len(verdict.violations))


def _observed_restart(
    restart_broker: Callable[[], object],
    broker: LocalBroker,
    pki: DevPki,
    capture: Path,
    back: list[float],
) -> Callable[[], None]:
    """``restart_broker`` (Mosquitto's restart, a cluster's node failure), then wait
    until the observer's subscription is live again: what the broker acknowledged
    before then may be lost to the observer too."""

    def restart() -> None:
        restart_broker()
        try:
            asyncio.run(
                wait_observing(broker.host, broker.port, pki, capture, protocol=broker.protocol)
            )
        except ConfigError as exc:  # judged all the same: its window lasts until now
            print(f"smartmi-sim: warning: {exc}", file=sys.stderr)
        back.append(time.time())

    return restart


async def _with_task_dump(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work``; on SIGUSR1 print where every task waits (a run that seems stuck)."""

    def dump() -> None:
        tasks = asyncio.all_tasks()
        kinds = Counter(t.get_coro().__qualname__ for t in tasks)  # type: ignore[union-attr]
        print(f"smartmi-sim: {len(tasks)} tasks: {dict(kinds)}", file=sys.stderr)
        rare = [t for t in tasks if kinds[t.get_coro().__qualname__] < 50]  # type: ignore[union-attr]
        for task in rare[:100]:
            task.print_stack(limit=4, file=sys.stderr)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, dump)
    try:
        await work
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


def _judge(fleet: Fleet, outputs: Outputs) -> int:
    """Check what the backend (and an observer) received; write and print the report."""
    truths = {d: dev.truth for d, dev in fleet.devices.items()}
    capture = (
        timeline.read_capture(outputs.capture)
        if outputs.capture is not None
        else timeline.Capture()
    )
    capture.note_in(truths)  # when the broker forwarded each command
    captured = capture.received
    for r in captured:  # the observer bounds departures too (it reads faster)
        truth = truths.get(r.device_id)
        if truth is not None and r.msg_id is not None:
            truth.seen_at.setdefault(r.msg_id, r.arrived_at)
    verdict = check(truths, fleet.cloud.received, outages=fleet.outages())
    doc = report.build(fleet, verdict)
    if outputs.timeline is not None:
        timeline.write(outputs.timeline, truths, fleet.outages())
    if outputs.received is not None:
        timeline.write_capture(outputs.received, fleet.cloud.received)
    if outputs.metrics is not None:
        metrics.write_file(outputs.metrics, fleet.final_status)
    failures = len(verdict.violations)
    if outputs.capture is not None:
        seen = check(truths, captured, outages=fleet.outages())
        agree = Counter(v.kind for v in seen.violations) == Counter(
            v.kind for v in verdict.violations
        )
        doc["capture"] = report.judged(seen, doc["grace_s"]) | {"agrees": agree}
        failures = max(failures, len(seen.violations))
    outputs.write(doc, fleet.cloud.received, verdict, truths)
    print(report.summary(doc))
    if "capture" in doc:
        cap = doc["capture"]
        print(
            f"  capture     {cap['unique']} unique seen by an observer at the broker: "
            f"{len(cap['violations'])} violations, "
            + ("agrees with the backend" if cap["agrees"] else "DISAGREES with the backend")
        )
    print(outputs.written())
    return _outcome(doc, failures)


def _outcome(doc: dict[str, Any], failures: int) -> int:
    """The exit code of a run, with its one line on stderr: NO_VERDICT when the fleet
    fell behind its schedule, or did not drain and found nothing; 1 with ``failures``
    violations, else 0."""
    late_by = doc["schedule"]["late"] or (None if failures else report.undrained(doc))
    if late_by:
        print(f"smartmi-sim: no verdict: {late_by}", file=sys.stderr)
        return NO_VERDICT
    if failures:
        counts = ", ".join(f"{n} {k}" for k, n in doc["violation_counts"].items() if n)
        print(
            f"smartmi-sim: {failures} privacy violations ({counts or 'in the capture'})",
            file=sys.stderr,
        )
        return 1
    return 0


def check_capture(
    timeline_paths: list[Path], capture_paths: list[Path], report_path: Path | None
) -> int:
    """``smartmi-sim check``: judge captures against timelines (the shards of one fleet,
    from one host or many, are merged); 0 only without violations."""
    truths, outages, received = read_shards(timeline_paths, capture_paths)
    verdict = check(truths, received, outages=outages)
    doc = report.judged(verdict, {t.group: t.grace_s for t in truths.values()})
    if report_path is not None:
        report.write_json(doc, report_path)
    names = ", ".join(str(p) for p in capture_paths)
    syncs = sum(1 for r in received if r.kind == "sync")
    print(
        f"capture {names}: {len(received)} messages from {len(truths)} devices: "
        f"{syncs} command syncs (not data), {doc['unique']} unique data messages "
        f"({doc['duplicates']} duplicates by msg_id)"
    )
    print("\n".join(report.verdict_summary(doc)))
    return 1 if verdict.violations else 0


@contextlib.contextmanager
def observe(
    host: str, port: int, pki: DevPki, out: Path, *, protocol: str = "v5"
) -> Iterator[None]:
    """``mosquitto_sub`` as the observer identity, writing every uplink and every
    command sent down to ``out``."""
    version = "mqttv5" if protocol == "v5" else "mqttv311"
    cmd = [
        "mosquitto_sub", "-h", host, "-p", str(port), "-V", version, "-q", "1",
        "-i", f"smartmi-observer-{os.getpid()}", "--cafile", str(pki.ca_cert),
        "--cert", str(pki.observer.cert), "--key", str(pki.observer.key),
        "-t", "smartmi/v1/+/up/#", "-t", "smartmi/v1/+/down/#", "-F", "%U %t %x",
    ]  # fmt: skip
    try:
        sink = out.open("wb")
    except OSError as exc:
        raise ConfigError(f"cannot write the capture: {exc.strerror}", where=str(out)) from exc
    try:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        sink.close()
        raise ConfigError(
            "--capture needs mosquitto_sub (Debian: apt-get install mosquitto-clients)"
        ) from None
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        sink.close()


async def wait_observing(
    host: str,
    port: int,
    pki: DevPki,
    out: Path,
    within: float = 60,
    *,
    protocol: Literal["v5", "v311"] = "v5",
) -> None:
    """Wait until the observer's subscription is live: a probe device's sync request
    (not data; the checker skips it) shows up in the capture. A broker busy with a
    reconnect storm may refuse or time out the probe: it tries again until ``within``."""
    probe = OBSERVER_PROBE
    ident = pki.ensure_devices([probe])[probe]
    options = mqtt.Options(
        host=host,
        port=port,
        tls=client_context(pki.ca_cert, ident.cert, ident.key),
        client_id=probe,
        protocol=protocol,
        persistent=False,
    )
    deadline = time.monotonic() + within
    marker = os.urandom(8).hex()
    while time.monotonic() < deadline:
        try:
            async with mqtt.connect(options) as conn:
                while time.monotonic() < deadline:
                    payload = json.dumps({"probe": marker}).encode()
                    await conn.publish(up_topic(probe, "sync"), payload)
                    await asyncio.sleep(0.2)
                    if marker.encode().hex().encode() in await asyncio.to_thread(out.read_bytes):
                        return
        except TransportError:
            await asyncio.sleep(0.5)
    raise ConfigError(f"the observer's capture stayed empty for {within:g} s", where=str(out))
