"""The NATS cluster's ACL and TLS, tested against a real nats-server over real TLS.

broker-config/acl written out per user (simulator/nats.py) must allow exactly what
Mosquitto allows: a device writes only its own up/ and reads only its own down/, the
backend reads every up/ and writes every down/, the observer only reads up/ and down/. MQTT
3.1.1 has no reason code in PUBACK, so a refused publish is judged by what arrives:
a marker published after it is the next message the subscriber sees.

The marker's order holds within one subscription: NATS gives each QoS 1 subscription a
JetStream consumer of its own, which delivers in the order the stream stored the
messages, and a QoS 1 publish is stored before its PUBACK. Two subscriptions are two
consumers with no order between them, so a filter that must deliver nothing is shown
refused in its SUBACK (no consumer at all) rather than waited on.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.core.identity import down_filter, down_topic, up_topic
from agent.errors import BrokerError, TransportError
from agent.runtime import mqtt as agent_mqtt
from agent.runtime.tls import client_context
from simulator.nats import NatsCluster
from simulator.nats_config import users_conf
from simulator.pki import DevPki
from tests.mqtt_probe import PahoClient, ctx_for, raw_connect

pytestmark = pytest.mark.skipif(
    shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists(),
    reason="nats-server is not installed (Debian: apt-get install nats-server)",
)

CONNACK_OK = b"\x20\x02\x00\x00"


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    pki = DevPki(tmp_path_factory.mktemp("nats-pki")).ensure()
    pki.ensure_devices(["acl-a", "acl-b", "acl-stranger"])
    with NatsCluster(pki, nodes=1, devices=["acl-a", "acl-b"]) as cluster:
        yield cluster


def _client(nats: NatsCluster, name: str, client_id: str | None = None) -> PahoClient:
    pki = nats.pki
    ident = {"backend": pki.backend, "observer": pki.observer}.get(name) or pki.device(name)
    c = PahoClient(nats, pki.ca_cert, ident, client_id or f"{name}-probe", mqtt.MQTTv311)
    assert c.connect() == 0
    return c


@pytest.fixture
def clients(nats: NatsCluster) -> Iterator[dict[str, PahoClient]]:
    made = {n: _client(nats, n) for n in ("acl-a", "acl-b", "backend", "observer")}
    yield made
    for c in made.values():
        c.close()


def _only(client: PahoClient, topic: str, payload: bytes) -> None:
    """The next message is exactly this marker: nothing published before it came first."""
    msg = client.next_message()
    assert (msg.topic, msg.payload) == (topic, payload)


def test_a_device_cannot_publish_to_another_devices_up(clients: dict[str, PahoClient]) -> None:
    a, backend = clients["acl-a"], clients["backend"]
    assert not backend.subscribe("smartmi/v1/+/up/#").is_failure
    a.publish(up_topic("acl-b", "crash"), b"forged")
    a.publish(up_topic("acl-a", "crash"), b"marker")
    _only(backend, up_topic("acl-a", "crash"), b"marker")


def test_a_device_cannot_read_another_devices_down(clients: dict[str, PahoClient]) -> None:
    a, backend = clients["acl-a"], clients["backend"]
    assert a.subscribe("smartmi/v1/acl-b/down/#").is_failure
    assert not a.subscribe("smartmi/v1/acl-a/down/#").is_failure
    backend.publish(down_topic("acl-b", "consent"), b"for b")
    backend.publish(down_topic("acl-a", "consent"), b"marker")
    _only(a, down_topic("acl-a", "consent"), b"marker")


def test_a_device_cannot_write_down_or_read_up(clients: dict[str, PahoClient]) -> None:
    a, b, backend = clients["acl-a"], clients["acl-b"], clients["backend"]
    assert a.subscribe("smartmi/v1/+/up/#").is_failure
    assert not a.subscribe("smartmi/v1/acl-a/down/#").is_failure
    a.publish(down_topic("acl-a", "consent"), b"self-command")
    b.publish(up_topic("acl-b", "crash"), b"b's data")
    backend.publish(down_topic("acl-a", "consent"), b"marker")
    _only(a, down_topic("acl-a", "consent"), b"marker")


def test_the_backend_sees_every_up_and_the_observer_only_reads(
    clients: dict[str, PahoClient],
) -> None:
    a, b, backend, observer = (clients[n] for n in ("acl-a", "acl-b", "backend", "observer"))
    assert not backend.subscribe("smartmi/v1/+/up/#").is_failure
    assert not observer.subscribe("smartmi/v1/+/up/#").is_failure
    assert not observer.subscribe("smartmi/v1/+/down/#").is_failure
    assert not a.subscribe("smartmi/v1/acl-a/down/#").is_failure
    observer.publish(down_topic("acl-a", "consent"), b"from the observer")
    a.publish(up_topic("acl-a", "activation"), b"from a")
    b.publish(up_topic("acl-b", "activation"), b"from b")
    want = {
        (up_topic("acl-a", "activation"), b"from a"),
        (up_topic("acl-b", "activation"), b"from b"),
    }
    for reader in (backend, observer):
        got = {(m.topic, m.payload) for m in (reader.next_message(), reader.next_message())}
        assert got == want
    backend.publish(down_topic("acl-a", "consent"), b"marker")
    _only(a, down_topic("acl-a", "consent"), b"marker")
    _only(observer, down_topic("acl-a", "consent"), b"marker")  # its own was refused


def test_a_device_claiming_another_client_id_still_acts_as_itself(
    nats: NatsCluster, clients: dict[str, PahoClient]
) -> None:
    # NATS does not tie the client ID to the certificate as Mosquitto does; the
    # permissions follow the certificate's subject all the same.
    backend = clients["backend"]
    assert not backend.subscribe("smartmi/v1/+/up/#").is_failure
    liar = _client(nats, "acl-a", client_id="acl-b")
    try:
        liar.publish(up_topic("acl-b", "crash"), b"forged")
        liar.publish(up_topic("acl-a", "crash"), b"marker")
        _only(backend, up_topic("acl-a", "crash"), b"marker")
    finally:
        liar.close()


def test_a_device_the_cluster_does_not_list_is_refused(nats: NatsCluster) -> None:
    stranger = PahoClient(
        nats, nats.pki.ca_cert, nats.pki.device("acl-stranger"), "acl-stranger", mqtt.MQTTv311
    )
    try:
        assert stranger.connect() != 0  # not authorized
    finally:
        stranger.close()


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256"])
def test_tls_1_2_refuses_cbc_suites(nats: NatsCluster, cipher: str) -> None:
    ident = nats.pki.device("acl-a")
    ctx = ctx_for(nats.pki.ca_cert, ident)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    with pytest.raises(ssl.SSLError) as info:
        raw_connect(ctx, nats.host, nats.port)
    assert "handshake failure" in str(info.value).lower()
    ok = ctx_for(nats.pki.ca_cert, ident)
    ok.maximum_version = ssl.TLSVersion.TLSv1_2
    ok.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    assert raw_connect(ok, nats.host, nats.port) == CONNACK_OK


def test_a_device_id_with_a_dot_is_refused_with_the_reason() -> None:
    with pytest.raises(BrokerError, match=r"'fan\.kitchen' contains '\.'"):
        users_conf(["dev-1", "fan.kitchen"])


def test_a_subscription_the_cluster_refuses_is_an_error_not_silence(nats: NatsCluster) -> None:
    """NATS answers a refused SUBSCRIBE with 0x80: the adapter raises, so the caller
    (a device's down/, the backend's up/) connects again instead of waiting, subscribed
    to nothing."""
    pki = nats.pki
    ident = pki.device("acl-a")
    tls = client_context(pki.ca_cert, ident.cert, ident.key)
    host, port = nats.host, nats.ports[0]
    options = agent_mqtt.Options(host, port, tls, "acl-a-refused", protocol="v311")

    async def attempt() -> None:
        async with agent_mqtt.connect(options) as conn:
            await conn.subscribe(down_filter("acl-a"))  # its own: granted
            await conn.subscribe_many([down_filter("acl-a"), down_filter("acl-b")])

    with pytest.raises(
        TransportError, match=r"refused the subscription to smartmi/v1/acl-b/down/\+ \("
    ):
        asyncio.run(attempt())
