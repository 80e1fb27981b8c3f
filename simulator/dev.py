"""The developer's local setup: a TLS broker (Mosquitto, or a NATS cluster) with a
dev cloud beside it that answers the agents' command syncs (``smartmi-sim broker
up``), and an agent configuration for a dev device (``smartmi-sim agent-config``)."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from agent.errors import AgentError
from simulator.broker import LocalBroker, MosquittoBroker, find_mosquitto
from simulator.cloud import Cloud
from simulator.nats import NatsCluster
from simulator.nats_config import find_nats_server, nats_device_id
from simulator.pki import DevPki

AGENT_TOML = """\
# A development agent for device {device_id}, against `smartmi-sim broker up`.
[device]
id = "{device_id}"
serial = "DEV-{device_id}"
model = "smartmi.fan.dev"
firmware_version = "1.0.0"

[privacy]
policy_version = "1"

[paths]
state_dir = "agents/{device_id}"

[broker]
url = "mqtts://{host}:{port}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"""


def write_agent_config(
    pki: DevPki, device_id: str, out: Path, *, host: str, port: int, force: bool
) -> int:
    """Write an agent.toml for one dev device (issuing its certificate if needed)."""
    pki.ensure()
    ident = pki.ensure_devices([device_id])[device_id]
    if out.exists() and not force:
        print(f"{out} exists (use --force to rewrite it)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        AGENT_TOML.format(
            device_id=device_id,
            host=host,
            port=port,
            ca=pki.ca_cert,
            cert=ident.cert,
            key=ident.key,
        )
    )
    print(f"wrote {out}; run: smartmi-agent --config {out} run")
    return 0


def broker_up(
    pki: DevPki,
    *,
    cluster: int,
    port: int | None,
    bind: str,
    sample_device: str,
    cloud: bool,
) -> int:
    """Run a local Mosquitto (or a NATS cluster) with the fleet's TLS setup, and a dev
    cloud beside it unless ``cloud`` is off, until Ctrl-C or SIGTERM."""
    if cluster:
        find_nats_server()  # fail before generating anything if the binary is missing
    else:
        find_mosquitto()
    pki.ensure()
    pki.ensure_devices([sample_device])
    sample = pki.device(sample_device)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    broker: LocalBroker
    if cluster:
        broker = NatsCluster(pki, nodes=cluster, port=port, bind=bind, devices=_issued(pki))
    else:
        broker = MosquittoBroker(pki, port=port, bind=bind, connection_messages=True)
    with broker:
        host = broker.host
        # A minimal cloud beside the broker: it answers the agents' command syncs, so an
        # agent on this bare broker does not hold its personal data (SPEC §3).
        responder = threading.Thread(target=_answer_syncs, args=(broker, pki, stop), daemon=True)
        if cloud:
            responder.start()
        if cluster:
            print(f"NATS cluster of {cluster} (MQTT 3.1.1, mutual TLS) listening on:")
            for url in broker.urls if isinstance(broker, NatsCluster) else ():
                print(f"  {url}")
            print('  agents: protocol = "v311", fallback_urls = the other nodes')
        else:
            print(f"Mosquitto (mutual TLS) listening on {broker.url}")
        print(f"  CA:             {pki.ca_cert}")
        print(f"  backend:        --cert {pki.backend.cert} --key {pki.backend.key}")
        print(f"  sample device:  --cert {sample.cert} --key {sample.key}")
        print(f"  broker log:     {broker.log_path}")
        print("Watch every device's uplink as an observer (it can read, not write):")
        version = "mqttv311" if broker.protocol == "v311" else "mqttv5"
        print(
            f"  mosquitto_sub -h {host} -p {broker.port} -V {version} -i watcher "
            f"--cafile {pki.ca_cert} --cert {pki.observer.cert} --key {pki.observer.key} "
            "-t 'smartmi/v1/+/up/#' -v"
        )
        if cloud:
            print("A dev cloud answers the agents' command syncs (--no-cloud: none does).")
        print("Press Ctrl-C to stop.", flush=True)
        ticks = 0
        while not stop.wait(0.5):
            if not broker.running:
                print(
                    f"the broker stopped unexpectedly; log:\n{broker.log_tail()}", file=sys.stderr
                )
                return 1
            ticks += 1
            if cluster and ticks % 4 == 0:
                # Devices issued since (smartmi-sim pki device) get their ACL entries.
                broker.authorize(_issued(pki))
    print("broker stopped")
    return 0


def _issued(pki: DevPki) -> list[str]:
    """The device IDs the dev PKI has issued that a NATS cluster can serve; the others
    are named on stderr once (NATS subjects cannot carry a '.')."""
    ids = []
    for cert in sorted((pki.root / "devices").glob("*.pem")):
        try:
            ids.append(nats_device_id(cert.stem))
        except AgentError as exc:
            if cert.stem not in _SKIPPED:
                _SKIPPED.add(cert.stem)
                print(f"smartmi-sim: warning: not served: {exc}", file=sys.stderr)
    return ids


_SKIPPED: set[str] = set()


def _answer_syncs(broker: LocalBroker, pki: DevPki, stop: threading.Event) -> None:
    """The dev cloud: the backend identity, answering every command sync until ``stop``."""

    async def serve() -> None:
        async with Cloud.on(broker, pki).connected():
            while not stop.is_set():  # noqa: ASYNC110  # a thread's Event, set by a signal
                await asyncio.sleep(0.5)

    try:
        asyncio.run(serve())
    except AgentError as exc:
        print(f"dev cloud: {exc}", file=sys.stderr)
