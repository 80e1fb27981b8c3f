"""The transport against a real Mosquitto: restarts, refusals, certificates, hostile commands."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from agent.core.identity import up_topic
from agent.core.purposes import Purpose, rfc3339
from agent.errors import CommandRejected, PublishRefused, TransportError
from agent.runtime import mqtt
from agent.runtime.tls import client_context
from simulator.broker import MosquittoBroker
from simulator.cloud import Cloud
from simulator.pki import DevPki
from simulator.rig import Agent, crash, running, until

pytestmark = pytest.mark.asyncio

MakeAgent = Callable[..., Agent]


async def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, own_broker: MosquittoBroker, pki: DevPki
) -> None:
    agent = Agent(tmp_path / "a", "restart-dev", own_broker, pki)
    core = agent.open()
    now = time.time()
    core.bind("b-1", now=now)
    core.grant(Purpose.DIAGNOSTICS, now=now)
    with core.store.db.transaction():
        captured = {core.capture_crash(crash(n), now=now) for n in range(1000)}

    def acknowledged() -> set[str]:
        assert agent.core is not None
        entries = agent.core.export(now=time.time())["entries"]
        return {e["msg_id"] for e in entries if e["type"] == "sent"}

    async with Cloud(own_broker.host, own_broker.port, pki).connected() as cloud:
        transport = agent.start()
        try:
            await until(cloud, lambda: transport.stats.acknowledged >= 50)
            own_broker.restart()
            # PUBACKs the broker sent before it stopped may still wait in the socket:
            # the connection's loss is noticed only after they are read.
            async with asyncio.timeout(10):
                while transport.connected.is_set() and transport.stats.connects < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            in_broker_custody = acknowledged()
            pending_at_restart = captured - in_broker_custody
            assert len(pending_at_restart) >= 100  # the restart was mid-stream
            await until(
                cloud,
                lambda: {m.envelope().get("msg_id") for m in cloud.received} >= pending_at_restart,
                within=60,
            )
            await agent.idle()
            assert acknowledged() == captured  # the agent lost nothing
        finally:
            await agent.stop()
        arrived = {m.envelope()["msg_id"] for m in cloud.received}
    # Everything the device still held at the restart arrived (duplicates allowed).
    # What had already been acknowledged was in the broker's custody: Mosquitto 2.0
    # may drop messages queued for a connected subscriber when it shuts down.
    assert arrived <= captured
    assert pending_at_restart <= arrived
    core = agent.open()
    assert core.queued_count() == 0
    await agent.stop()


async def test_v311_mode_delivers(make_agent: MakeAgent, cloud: Cloud) -> None:
    async with running(make_agent(protocol="v311")) as agent:
        core = agent.core
        assert core is not None
        core.bind("b-1", now=time.time())
        core.grant(Purpose.ACTIVATION, now=time.time())
        await until(cloud, lambda: len(cloud.of(agent.device_id)) == 1)
        await agent.idle()


async def test_refuses_a_broker_from_another_ca(
    make_agent: MakeAgent, foreign_pki: DevPki, cloud: Cloud
) -> None:
    agent = make_agent(ca=foreign_pki.ca_cert)
    core = agent.open()
    core.bind("b-1", now=time.time())
    core.grant(Purpose.ACTIVATION, now=time.time())
    transport = agent.start()
    try:
        async with asyncio.timeout(20):
            await transport.trouble.wait()
        assert transport.stats.last_error_kind == "unknown-ca"
        assert not transport.connected.is_set()
        assert transport.stats.connects == 0
        assert core.queued_count() == 1  # kept for a broker it can trust
    finally:
        await agent.stop()


async def test_an_expired_device_certificate_is_reported(
    make_agent: MakeAgent, pki: DevPki
) -> None:
    agent = make_agent(cert_for="expired-dev-e2e")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    pki.issue_device("expired-dev-e2e", not_before=past - dt.timedelta(days=1), not_after=past)
    agent.open()
    transport = agent.start()
    try:
        async with asyncio.timeout(30):
            await transport.trouble.wait()
        assert transport.stats.last_error_kind == "expired", transport.stats.last_error
        assert transport.stats.connects == 0
    finally:
        await agent.stop()


async def test_a_refused_puback_is_an_error_and_the_item_stays(
    make_agent: MakeAgent, cloud: Cloud
) -> None:
    # The configured ID differs from the certificate's CN: the ACL refuses (0x87).
    async with running(make_agent(cert_for="someone-else-e2e")) as agent:
        core, transport = agent.core, agent.transport
        assert core is not None
        assert transport is not None
        core.bind("b-1", now=time.time())
        core.grant(Purpose.ACTIVATION, now=time.time())
        async with asyncio.timeout(20):
            await transport.trouble.wait()
        assert transport.stats.last_error_kind == "publish-refused"
        assert transport.stats.refused == 1
        assert transport.stats.acknowledged == 0
        assert core.queued_count() == 1
        assert core.export(now=time.time())["entries"][-1]["type"] != "sent"
        assert cloud.of(agent.device_id) == []


def _hostile(device_binding: str, rng: random.Random) -> list[tuple[str, bytes]]:
    """Malformed, hostile, replayed and stale commands; none may change anything."""
    now = rfc3339(time.time())
    ok = {
        "command_id": "fuzz-base",
        "issued_at": now,
        "binding_id": device_binding,
        "purposes": {"diagnostics": True},
        "policy_version": "1",
    }
    cases: list[tuple[str, bytes]] = [
        ("consent", b""),
        ("consent", b"\xff\xfe\x00"),
        ("consent", b"[]"),
        ("consent", b"null"),
        ("consent", b"[" * 4000),  # nesting past the JSON parser's recursion limit
        ("consent", b"[" * 60_000),  # over the 4 KiB limit, under the broker's 64 KiB
        ("consent", b"{" + b" " * 5000 + b"}"),
        ("consent", json.dumps({**ok, "extra": 1}).encode()),
        ("consent", json.dumps({**ok, "purposes": {"location": True}}).encode()),
        ("consent", json.dumps({**ok, "purposes": {"diagnostics": "yes"}}).encode()),
        ("consent", json.dumps({**ok, "purposes": {}}).encode()),
        ("consent", json.dumps({**ok, "binding_id": "someone-else"}).encode()),
        ("consent", json.dumps({**ok, "policy_version": "0"}).encode()),
        ("consent", json.dumps({**ok, "issued_at": "2001-01-01T00:00:00Z"}).encode()),
        ("consent", json.dumps({**ok, "issued_at": "2999-01-01T00:00:00Z"}).encode()),
        ("consent", json.dumps({**ok, "issued_at": "yesterday"}).encode()),
        ("consent", json.dumps({**ok, "command_id": "a/b#+"}).encode()),
        ("consent", json.dumps({**ok, "command_id": 7}).encode()),
        ("consent", b'{"command_id": NaN}'),
        ("location-precision", json.dumps({**ok, "precision": "street"}).encode()),
        ("unbind", json.dumps({k: ok[k] for k in ("command_id", "issued_at")}).encode()),
        ("self-destruct", json.dumps(ok).encode()),
        ("suspend-collection", json.dumps({"command_id": "x"}).encode()),
    ]
    # Mutations start from a command for another binding, so none can become valid.
    valid = json.dumps({**ok, "binding_id": "someone-elses-binding"}).encode()
    for _case in range(200):
        data = bytearray(valid)
        for _byte in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append((rng.choice(["consent", "unbind", "suspend-collection"]), bytes(data)))
        cases.append(("consent", rng.randbytes(rng.randint(0, 300))))
    return cases


async def test_command_handler_survives_a_hostile_stream(
    make_agent: MakeAgent, cloud: Cloud
) -> None:
    async with running(make_agent()) as agent:
        core, transport = agent.core, agent.transport
        assert core is not None
        assert transport is not None
        core.bind("b-fuzz", now=time.time())
        await agent.synced()
        before = core.status()
        cases = _hostile("b-fuzz", random.Random(1234))
        for name, payload in cases:
            await cloud.send_raw(agent.device_id, name, payload)
        outcomes = [await agent.next_command() for _ in cases]
        # A mutated byte may still leave valid JSON that is refused for another reason,
        # but nothing in the stream may be applied.
        assert all(isinstance(o[1], CommandRejected) for o in outcomes), [
            o for o in outcomes if not isinstance(o[1], CommandRejected)
        ]
        assert core.status() == before
        assert transport.connected.is_set()
        assert transport.stats.connects == 1
        # Still listening: a valid command is applied, once.
        body = {"binding_id": "b-fuzz", "purposes": {"diagnostics": True}, "policy_version": "1"}
        body["command_id"] = "fuzz-valid"
        await cloud.command(agent.device_id, "consent", body)
        assert await agent.next_command() == ("consent", {"consent:diagnostics": "applied"})
        await cloud.command(agent.device_id, "consent", body)  # replayed
        name, outcome = await agent.next_command()
        assert isinstance(outcome, CommandRejected)
        assert outcome.reason == "replay"
        assert core.decide(Purpose.DIAGNOSTICS).allowed


async def test_errors_raised_together_leave_the_adapter_as_one(
    broker: MosquittoBroker, pki: DevPki
) -> None:
    """As a link breaks, the sync, drain and command tasks can all fail at once; the
    transport's reconnect loop must get one TransportError, not an ExceptionGroup."""
    ident = pki.ensure_devices(["group-errors-1"])["group-errors-1"]
    options = mqtt.Options(
        host=broker.host,
        port=broker.port,
        tls=client_context(pki.ca_cert, ident.cert, ident.key),
        client_id="group-errors-1",
        persistent=False,
    )
    with pytest.raises(TransportError) as caught:
        async with mqtt.connect(options):
            raise ExceptionGroup(
                "tasks",
                [aiomqtt.MqttCodeError(4, "not connected"), TransportError("could not publish")],
            )
    assert not isinstance(caught.value, ExceptionGroup)


def _options(broker: MosquittoBroker, pki: DevPki, device_id: str) -> mqtt.Options:
    ident = pki.ensure_devices([device_id])[device_id]
    return mqtt.Options(
        host=broker.host,
        port=broker.port,
        tls=client_context(pki.ca_cert, ident.cert, ident.key),
        client_id=device_id,
        persistent=False,
    )


async def test_a_publish_waits_for_its_puback_and_a_refusal_is_an_error(
    broker: MosquittoBroker, pki: DevPki
) -> None:
    async with mqtt.connect(_options(broker, pki, "adapter-pub-1")) as conn:
        await conn.publish(up_topic("adapter-pub-1", "crash"), b"{}", ack_within=10)
        with pytest.raises(PublishRefused) as refused:  # another device's topic (ACL)
            await conn.publish(up_topic("adapter-pub-2", "crash"), b"{}", ack_within=10)
        assert refused.value.reason_code == 0x87


async def test_a_connection_that_ends_fails_the_publishes_waiting_at_once(
    broker: MosquittoBroker, pki: DevPki
) -> None:
    """Not after their own time limit: the backend's sync answers wait up to 120 s."""
    failed: list[TransportError] = []
    t0 = time.monotonic()
    with contextlib.suppress(TransportError):  # the connection's own end, as it is left
        async with mqtt.connect(_options(broker, pki, "adapter-pub-3")) as conn:
            conn.abort()
            try:
                await conn.publish(up_topic("adapter-pub-3", "crash"), b"{}", ack_within=60)
            except TransportError as exc:
                failed.append(exc)
    assert time.monotonic() - t0 < 10
    assert [str(e) for e in failed] == ["the connection ended before the PUBACK"]
