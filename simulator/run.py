"""``smartmi-sim run``: a fleet against a broker, the checker's verdict, the report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.runtime.tls import client_context
from simulator import report
from simulator.broker import MosquittoBroker
from simulator.checker import check
from simulator.fleet import Fleet
from simulator.pki import DevPki
from simulator.scenario import load_scenario


def run(  # the command line's options
    *,
    devices: int,
    scenario_path: Path,
    dev_dir: Path,
    report_path: Path,
    junit_path: Path | None = None,
    broker_url: str | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    seed: int | None = None,
) -> int:
    """Run the fleet; 0 only with zero violations."""
    if devices < 1:
        raise ConfigError("--devices must be at least 1")
    # Per-device connection chatter would drown the progress lines; the report has
    # the counts. Errors (certificate problems) still show.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    scenario = load_scenario(scenario_path)
    if broker_url is not None and scenario.restarts_broker:
        raise ConfigError(
            "the scenario restarts the broker, which the simulator can do only to a broker "
            "it started: run it without --broker, or remove its broker-restart events",
            where=str(scenario_path),
        )
    pki = DevPki(dev_dir / "pki").ensure()
    workdir = dev_dir / "runs" / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with contextlib.ExitStack() as stack:
        cloud_tls = None
        restart = None
        if broker_url is None:
            broker = stack.enter_context(MosquittoBroker(pki))
            host, port = broker.host, broker.port
            restart = broker.restart
            print(f"started Mosquitto on {broker.url} (log {broker.log_path})", file=sys.stderr)
        else:
            if not (ca and cert and key):
                raise ConfigError("--broker needs --ca, --cert and --key (the backend's identity)")
            parts = urlsplit(broker_url)
            if parts.scheme != "mqtts" or not parts.hostname:
                raise ConfigError(f"--broker must be an mqtts:// URL, not {broker_url!r}")
            host, port = parts.hostname, parts.port or 8883
            cloud_tls = client_context(ca, cert, key)
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
        )
        asyncio.run(fleet.run())
    verdict = check(
        {d: dev.truth for d, dev in fleet.devices.items()},
        fleet.cloud.received,
        outages=fleet.outages(),
    )
    doc = report.build(fleet, verdict)
    report.write_json(doc, report_path)
    if junit_path is not None:
        report.write_junit(doc, junit_path)
    print(report.summary(doc))
    print(f"report: {report_path}" + (f", JUnit: {junit_path}" if junit_path else ""))
    if verdict.violations:
        counts = ", ".join(f"{n} {k}" for k, n in doc["violation_counts"].items() if n)
        print(
            f"smartmi-sim: {len(verdict.violations)} privacy violations ({counts})",
            file=sys.stderr,
        )
        return 1
    return 0
