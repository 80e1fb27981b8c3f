"""The cloud on a NATS cluster reads the uplink from JetStream, and the checker judges
departure by the time the broker stored each message (SPEC §4, §5).

Against a real nats-server over mutual TLS: the backend's uplink is a JetStream pull
consumer, not an MQTT subscription (one MQTT session for a whole fleet is what broke
at 3,000 agents); each message carries the broker's stored time, taken before the
PUBACK; a backend that reads late does not turn an item that left in time into a
violation; and only a backend identity may use the NATS port at all.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from agent.core.identity import up_topic
from agent.core.purposes import Purpose
from agent.runtime.tls import client_context
from simulator.checker import check
from simulator.cloud import Cloud, Received
from simulator.jetstream import STREAM, UP_SUBJECT
from simulator.nats import NatsCluster
from simulator.pki import DevPki
from simulator.truth import DeviceTruth
from tests.core.test_checker import message
from tests.mqtt_probe import PahoClient

pytestmark = [
    pytest.mark.skipif(
        shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists(),
        reason="nats-server is not installed (Debian: apt-get install nats-server)",
    ),
    pytest.mark.slow,  # a NATS cluster (with JetStream) per module
]

DEVICE = "js-a"
WAIT_S = 20.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    pki = DevPki(tmp_path_factory.mktemp("js-pki")).ensure()
    pki.ensure_devices([DEVICE])
    with NatsCluster(pki, nodes=1, devices=[DEVICE]) as running:
        yield running


@pytest.fixture
def device(cluster: NatsCluster) -> Iterator[PahoClient]:
    import paho.mqtt.client as mqtt

    client = PahoClient(
        cluster, cluster.pki.ca_cert, cluster.pki.device(DEVICE), DEVICE, mqtt.MQTTv311
    )
    assert client.connect() == 0
    yield client
    client.close()


def _crash(msg_id: str, captured: float) -> bytes:
    return message("crash", msg_id, captured, captured, device=DEVICE).payload


async def _read(cloud: Cloud, msg_id: str) -> Received:
    async with asyncio.timeout(WAIT_S):
        got = await cloud.wait_for(lambda rs: any(r.msg_id == msg_id for r in rs))
    return next(r for r in got if r.msg_id == msg_id)


def test_the_backend_reads_from_jetstream_with_the_time_the_broker_stored_it(
    cluster: NatsCluster, device: PahoClient
) -> None:
    async def body() -> tuple[float, float, Received, dict[str, Any], dict[str, Any]]:
        async with Cloud.on(cluster, cluster.pki).connected() as cloud:
            before = time.time()
            await asyncio.to_thread(device.publish, up_topic(DEVICE, "crash"), _crash("s1", before))
            acked = time.time()
            got = await _read(cloud, "s1")
            subs = cluster.monitoring("/connz?subs=detail")
            consumers = cluster.monitoring("/jsz?consumers=true&config=true")
        return before, acked, got, subs, consumers

    before, acked, got, subs, consumers = asyncio.run(body())
    assert got.stored_at is not None, "the backend read it without the broker's stored time"
    assert before <= got.stored_at <= acked  # stored before the PUBACK reached the device
    # Nobody reads the fleet's uplink over MQTT: no connection subscribes to it...
    subscribed = [
        s.get("subject")
        for c in subs.get("connections") or []
        for s in c.get("subscriptions_list_detail") or []
    ]
    assert not [s for s in subscribed if str(s).startswith("smartmi.v1.*.up")], subscribed
    # ...and the backend's consumer of it is a pull consumer (no subject it pushes to).
    found = [
        c["config"]
        for a in consumers.get("account_details") or []
        for s in a.get("stream_detail") or []
        if s.get("name") == STREAM
        for c in s.get("consumer_detail") or []
        if c["config"].get("filter_subject") == UP_SUBJECT
    ]
    assert len(found) == 1, found
    assert not found[0].get("deliver_subject")


def test_a_late_backend_is_judged_by_when_the_broker_stored_the_message(
    cluster: NatsCluster, device: PahoClient
) -> None:
    """A crash stored before the user withdrew, read by the backend long after the
    withdrawal and its grace: no violation. Judged by arrival it would be one."""

    async def body() -> tuple[float, Received]:
        cloud = Cloud.on(cluster, cluster.pki)
        async with cloud.connected():
            pass  # the consumer is durable: JetStream keeps the uplink for it meanwhile
        sent = time.time()
        await asyncio.to_thread(device.publish, up_topic(DEVICE, "crash"), _crash("s2", sent))
        await asyncio.sleep(3.0)  # the withdrawal below, then more than its 2 s grace
        async with cloud.connected():
            return sent, await _read(cloud, "s2")

    sent, got = asyncio.run(body())
    truth = DeviceTruth(DEVICE, "g", "1", grace_s=2.0)
    truth.log(sent - 10, "bind", minor=False)
    truth.log(sent - 9, "grant", purpose=Purpose.DIAGNOSTICS.value)
    truth.log(sent + 0.5, "withdraw", purpose=Purpose.DIAGNOSTICS.value)
    assert got.arrived_at > sent + 2.5
    assert check({DEVICE: truth}, [got]).violations == []
    by_arrival = Received(got.device_id, got.kind, got.payload, got.arrived_at)
    assert [v.kind for v in check({DEVICE: truth}, [by_arrival]).violations] == ["no-consent"]


def test_only_a_backend_identity_may_use_the_nats_port(cluster: NatsCluster) -> None:
    """A device's certificate is refused there (MQTT only): it cannot read the stream."""
    pki = cluster.pki
    ident = pki.device(DEVICE)

    async def connect() -> None:
        nc = NATS()
        try:
            await nc.connect(
                servers=cluster.jetstream_urls,
                tls=client_context(pki.ca_cert, ident.cert, ident.key),
                allow_reconnect=False,
                connect_timeout=5,
                max_reconnect_attempts=0,
            )
        finally:  # nats-py leaves a refused first connection open: close it here
            await nc.close()

    with pytest.raises((NatsError, OSError)):
        asyncio.run(connect())
