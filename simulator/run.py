"""``smartmi-sim run``: a fleet against a broker, the checker's verdict, the report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from agent.core.identity import up_topic
from agent.errors import ConfigError, TransportError
from agent.runtime import mqtt
from agent.runtime.tls import client_context
from simulator import report, timeline
from simulator.broker import LocalBroker, MosquittoBroker
from simulator.checker import check
from simulator.fleet import Fleet
from simulator.nats import NatsCluster
from simulator.pki import DevPki
from simulator.scenario import load_scenario

# A device identity whose command syncs show that the observer's capture is live.
OBSERVER_PROBE: Final = "sim-observer-probe"


@dataclass(frozen=True)
class Outputs:
    """Where a run writes what it found."""

    report: Path
    junit: Path | None = None
    timeline: Path | None = None
    capture: Path | None = None

    def check(self) -> None:
        """Every output can be written: found before the run, not after it."""
        for option, path in (
            ("--report", self.report),
            ("--junit", self.junit),
            ("--timeline", self.timeline),
            ("--capture", self.capture),
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


@dataclass(frozen=True)
class ExternalBroker:
    """A broker the simulator did not start, and the backend's identity on it."""

    url: str
    ca: Path | None
    cert: Path | None
    key: Path | None

    def address(self) -> tuple[str, int, ssl.SSLContext]:
        """Host, port and the backend's TLS context; ConfigError on a bad URL or identity."""
        if not (self.ca and self.cert and self.key):
            raise ConfigError("--broker needs --ca, --cert and --key (the backend's identity)")
        parts = urlsplit(self.url)
        if parts.scheme != "mqtts" or not parts.hostname:
            raise ConfigError(f"--broker must be an mqtts:// URL, not {self.url!r}")
        return parts.hostname, parts.port or 8883, client_context(self.ca, self.cert, self.key)


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
) -> int:
    """Run the fleet; 0 only with zero violations (of the backend's and any capture's).

    With ``cluster`` N (and no external broker) the fleet runs against an N-node NATS
    cluster instead of one Mosquitto, its devices spread over the nodes.
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
    if broker is not None and cluster:
        raise ConfigError("--cluster starts a local NATS cluster; it cannot go with --broker")
    if broker is not None and scenario.restarts_broker:
        raise ConfigError(
            "the scenario restarts the broker, which the simulator can do only to a broker "
            "it started: run it without --broker, or remove its broker-restart events",
            where=str(scenario_path),
        )
    pki = DevPki(dev_dir / "pki").ensure()
    workdir = dev_dir / "runs" / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
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
                restart = _observed_restart(started, pki, outputs.capture, observer_back)
        else:
            host, port, cloud_tls = broker.address()
        protocol = local.protocol if local is not None else "v5"
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
            ports=local.ports if local is not None else (),
            backend_persistent=local.backend_persistent if local is not None else False,
            authorize=local.authorize if local is not None else None,
        )
        fleet.observer_back = observer_back
        asyncio.run(_with_task_dump(fleet.run()))
    return _judge(fleet, outputs)


def _observed_restart(
    broker: LocalBroker, pki: DevPki, capture: Path, back: list[float]
) -> Callable[[], None]:
    """Restart the broker, then wait until the observer's subscription is live again:
    what the broker acknowledged before then may be lost to the observer too."""

    def restart() -> None:
        broker.restart()
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
    captured = timeline.read_capture(outputs.capture) if outputs.capture is not None else []
    for r in captured:  # the observer bounds departures too (it reads faster)
        truth = truths.get(r.device_id)
        if truth is not None and r.msg_id is not None:
            truth.seen_at.setdefault(r.msg_id, r.arrived_at)
    verdict = check(truths, fleet.cloud.received, outages=fleet.outages())
    doc = report.build(fleet, verdict)
    if outputs.timeline is not None:
        timeline.write(outputs.timeline, truths, fleet.outages())
    failures = len(verdict.violations)
    if outputs.capture is not None:
        seen = check(truths, captured, outages=fleet.outages())
        agree = Counter(v.kind for v in seen.violations) == Counter(
            v.kind for v in verdict.violations
        )
        doc["capture"] = report.judged(seen, doc["grace_s"]) | {"agrees": agree}
        failures = max(failures, len(seen.violations))
    report.write_json(doc, outputs.report)
    if outputs.junit is not None:
        report.write_junit(doc, outputs.junit)
    print(report.summary(doc))
    if "capture" in doc:
        cap = doc["capture"]
        print(
            f"  capture     {cap['unique']} unique seen by an observer at the broker: "
            f"{len(cap['violations'])} violations, "
            + ("agrees with the backend" if cap["agrees"] else "DISAGREES with the backend")
        )
    print(f"report: {outputs.report}" + (f", JUnit: {outputs.junit}" if outputs.junit else ""))
    if failures:
        counts = ", ".join(f"{n} {k}" for k, n in doc["violation_counts"].items() if n)
        print(
            f"smartmi-sim: {failures} privacy violations ({counts or 'in the capture'})",
            file=sys.stderr,
        )
        return 1
    return 0


def check_capture(timeline_path: Path, capture_path: Path, report_path: Path | None) -> int:
    """``smartmi-sim check``: judge a capture against a timeline; 0 only without violations."""
    truths, outages = timeline.read(timeline_path)
    received = timeline.read_capture(capture_path)
    verdict = check(truths, received, outages=outages)
    doc = report.judged(verdict, {t.group: t.grace_s for t in truths.values()})
    if report_path is not None:
        report.write_json(doc, report_path)
    print(
        f"capture {capture_path}: {len(received)} messages, {doc['unique']} unique "
        f"({doc['duplicates']} duplicates by msg_id) from {len(truths)} devices"
    )
    print("\n".join(report.verdict_summary(doc)))
    return 1 if verdict.violations else 0


@contextlib.contextmanager
def observe(
    host: str, port: int, pki: DevPki, out: Path, *, protocol: str = "v5"
) -> Iterator[None]:
    """``mosquitto_sub`` as the observer identity, writing every uplink to ``out``."""
    version = "mqttv5" if protocol == "v5" else "mqttv311"
    cmd = [
        "mosquitto_sub", "-h", host, "-p", str(port), "-V", version, "-q", "1",
        "-i", f"smartmi-observer-{os.getpid()}", "--cafile", str(pki.ca_cert),
        "--cert", str(pki.observer.cert), "--key", str(pki.observer.key),
        "-t", "smartmi/v1/+/up/#", "-F", "%U %t %x",
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
