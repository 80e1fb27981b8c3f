"""Whether a broker serves MQTT yet: a real connection as the backend, each attempt
bounded, run on an event loop of its own so a caller inside one can wait for it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, Final, Literal

from agent.core.identity import BACKEND_ID
from agent.errors import TransportError
from agent.runtime import mqtt
from agent.runtime.tls import client_context
from simulator.pki import DevPki

PROBE_ATTEMPT_S: Final = 6.0  # one MQTT probe: longer than NATS's 4 s for a JetStream request


def run_apart(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to the end on an event loop of its own, in a thread of its own, so
    that a caller already inside an event loop can use the synchronous starter."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(work)
        except BaseException as exc:  # noqa: BLE001  # handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=target, name="broker-probe")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def serves_mqtt(
    pki: DevPki,
    host: str,
    port: int,
    protocol: Literal["v5", "v311"],
    deadline: float,
    *,
    name: str = "1",
) -> bool:
    """An MQTT connection succeeds (the first one on a NATS cluster creates the MQTT
    streams, which can take seconds); tried until ``deadline`` (``time.monotonic``),
    each attempt for at most ``PROBE_ATTEMPT_S``.

    On a loaded machine a NATS node's own request to create the streams can time out
    (NATS gives it 4 s) and the node then leaves that connection waiting; one attempt
    as long as the whole deadline waited on it to the end (seen in the suite at the
    first start of a three-node cluster), where a new attempt succeeds.
    """
    ctx = client_context(pki.ca_cert, pki.backend.cert, pki.backend.key)

    async def probe(within: float) -> None:
        options = mqtt.Options(
            host=host,
            port=port,
            tls=ctx,
            client_id=f"{BACKEND_ID}-probe-{name}",
            protocol=protocol,
            persistent=False,
            connect_timeout=within,
        )
        async with mqtt.connect(options):
            pass

    while time.monotonic() < deadline:
        try:
            left = deadline - time.monotonic()
            run_apart(probe(max(1.0, min(PROBE_ATTEMPT_S, left))))
        except TransportError:
            time.sleep(0.2)
            continue
        return True
    return False
