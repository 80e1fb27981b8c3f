"""An independent observer at the broker (``--capture``): ``mosquitto_sub`` as the
observer identity, and the wait until its subscription is live, at the start and
after each broker restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, Literal

from agent.core.identity import up_topic
from agent.errors import ConfigError, TransportError
from agent.runtime import mqtt
from agent.runtime.tls import client_context
from simulator.broker import LocalBroker
from simulator.pki import DevPki

# A device identity whose command syncs show that the observer's capture is live.
OBSERVER_PROBE: Final = "sim-observer-probe"


def observed_restart(
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
