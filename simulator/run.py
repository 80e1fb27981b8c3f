"""``smartmi-sim run``: a fleet against a broker, the checker's verdict, the report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.core.identity import MAX_BACKENDS
from agent.errors import ConfigError
from agent.runtime import metrics
from simulator import report, timeline
from simulator.broker import LocalBroker, MosquittoBroker
from simulator.checker import check
from simulator.external import ExternalBroker
from simulator.fleet import Fleet, FleetBroker
from simulator.jetstream import JetStreamAt
from simulator.nats import NatsCluster
from simulator.observer import OBSERVER_PROBE, observe, observed_restart, wait_observing
from simulator.outputs import INTERRUPTED, Outputs, new_run_dir, outcome
from simulator.pki import DevPki
from simulator.scenario import load_scenario
from simulator.workers import read_shards, run_workers


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
        return run_workers(
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
                restart = observed_restart(restart, started, pki, outputs.capture, observer_back)
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
            broker=FleetBroker(
                host,
                port,
                ports=local.ports if local is not None else broker.ports() if broker else (),
                protocol=protocol,
                cloud_tls=cloud_tls,
                backend_persistent=local.backend_persistent
                if local is not None
                else protocol == "v311",  # a broker without MQTT 5: NATS keeps the session
                jetstream=_jetstream_of(local, broker),
                restart=restart,
                authorize=local.authorize if local is not None else None,
                keeps_acknowledged=isinstance(local, NatsCluster),
            ),
            seed=seed,
            grace_s=grace_s,
            shard=shard,
        )
        fleet.observer_back = observer_back
        fleet.keep_status = outputs.metrics is not None
        _play(fleet, local)
    rc = _judge(fleet, outputs)
    return INTERRUPTED if fleet.was_interrupted else rc


def _jetstream_of(local: LocalBroker | None, broker: ExternalBroker | None) -> JetStreamAt | None:
    """Where the backend reads the uplink from JetStream, if it does (a NATS cluster)."""
    if local is not None:
        return local.jetstream
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
    return outcome(doc, failures)


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
