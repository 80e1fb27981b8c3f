"""Commands first, and acknowledged after they take effect (SPEC §3), on a real broker.

A device offline while the cloud withdraws, suspends or unbinds must apply that
before anything personal leaves after the reconnect; with no cloud to answer its
command sync it holds personal data (deletion requests still leave); and a command
whose effect could not be written is not acknowledged, so the broker delivers it
again and it is applied once.
"""

from __future__ import annotations

import asyncio
import json
import random
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.core.backoff import Backoff
from agent.core.identity import backend_id
from agent.core.purposes import Purpose, parse_rfc3339, rfc3339
from agent.errors import CommandRejected, StorageError
from agent.runtime import commands as commands_mod
from agent.runtime import mqtt
from simulator.broker import MosquittoBroker
from simulator.cloud import Cloud
from simulator.faults import FaultProxy
from simulator.pki import DevPki
from simulator.rig import Agent, crash, until
from tests.e2e.marker import before_marker
from tests.mqtt_probe import PahoClient

pytestmark = pytest.mark.asyncio

MakeAgent = Callable[..., Agent]


async def _offline_with_queue(agent: Agent, n: int = 20) -> None:
    """The device has been online once (its broker session exists), then goes offline
    with ``n`` crashes and an activation queued."""
    core = agent.open()
    now = time.time() - 60
    core.bind("b-1", now=now)
    agent.start()
    await agent.synced()
    await agent.stop()
    core = agent.open()
    core.set_location(48.137154, 11.575382, now=now)
    core.grant(Purpose.DIAGNOSTICS, now=now)
    core.grant(Purpose.ACTIVATION, now=now)
    for k in range(n):
        core.capture_crash(crash(k), now=now + 1)


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("consent", {"purposes": {"diagnostics": False, "activation": False}}, []),
        ("suspend-collection", {}, []),
        ("unbind", {}, ["deletion-request"]),
        ("account-cancelled", {}, ["deletion-request"]),
    ],
)
async def test_a_command_issued_while_offline_applies_before_anything_leaves(
    make_agent: MakeAgent, cloud: Cloud, name: str, body: dict[str, Any], expected: list[str]
) -> None:
    agent = make_agent()
    await _offline_with_queue(agent)
    owner = {"binding_id": "b-1", "policy_version": "1"} if name == "consent" else {}
    if name in ("unbind", "account-cancelled"):
        owner = {"binding_id": "b-1"}
    await cloud.command(agent.device_id, name, {**owner, **body})
    agent.start()
    try:
        await agent.synced()
        if expected:
            await until(cloud, lambda: len(cloud.of(agent.device_id)) >= len(expected))
        await agent.idle()
        assert [m.kind for m in await before_marker(agent, cloud)] == expected
    finally:
        await agent.stop()


async def test_without_an_answer_to_the_sync_personal_data_waits(
    make_agent: MakeAgent, cloud: Cloud
) -> None:
    agent = make_agent()
    await _offline_with_queue(agent, n=3)
    assert agent.core is not None
    agent.core.unbind(now=time.time())  # a deletion request, then a new owner's data
    agent.core.bind("b-2", now=time.time())
    agent.core.grant(Purpose.DIAGNOSTICS, now=time.time())
    held = agent.core.capture_crash(crash(99), now=time.time())
    cloud.answer_syncs = False  # a bare broker: nobody answers the command sync
    transport = agent.start()
    try:
        await agent.connected()
        await until(cloud, lambda: len(cloud.of(agent.device_id)) >= 1)
        # The first hand-over was the deletion request's, the crash held back from it.
        before = await before_marker(agent, cloud)
        assert [m.kind for m in before] == ["deletion-request"]  # it may leave at once
        assert not transport.status()["commands_synced"]
        assert agent.core.queued_count() == 1  # held, not dropped
        cloud.answer_syncs = True  # the cloud is back and answers the request it held
        cloud.answer_held(-1)
        await agent.synced()
        await until(cloud, lambda: held in {m.msg_id for m in cloud.of(agent.device_id)})
        after = cloud.of(agent.device_id)[len(before) + 1 :]  # after the marker
        assert [m.msg_id for m in after] == [held]
    finally:
        await agent.stop()


async def test_a_late_answer_to_an_earlier_request_of_this_connection_counts(
    tmp_path: Path, own_broker: MosquittoBroker, pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cloud slower than the retry must not be outrun: every repeated request was
    once answered only if it was the latest, so a fleet whose cloud answered each
    after the retry never synced (56,627 requests for 10,000 devices). An answer to
    a request of an earlier connection still does not count."""
    monkeypatch.setattr(commands_mod, "SYNC_RETRY", Backoff(base=0.2, cap=0.2, floor=0.2))
    agent = Agent(tmp_path / "a", "late-sync-dev", own_broker, pki)
    agent.open().bind("b-1", now=time.time() - 60)

    def sent_at(k: int) -> float:
        return parse_rfc3339(json.loads(cloud.held_syncs[k][1])["sent_at"])

    async with Cloud(own_broker.host, own_broker.port, pki).connected() as cloud:
        cloud.answer_syncs = False
        transport = agent.start()
        try:
            await until(cloud, lambda: len(cloud.held_syncs) >= 1)
            cut = time.time()
            own_broker.restart()  # that request's connection is gone; the transport goes on
            await until(
                cloud, lambda: sum(sent_at(k) > cut for k in range(len(cloud.held_syncs))) >= 2
            )
            mine = [k for k in range(len(cloud.held_syncs)) if sent_at(k) > cut]
            for k in range(mine[0]):  # the earlier connection's requests, answered in turn
                device_id, request = cloud.held_syncs[k]
                answer = {"sync_id": json.loads(request)["sync_id"], "now": rfc3339(time.time())}
                await cloud.send_raw(device_id, "sync", json.dumps(answer).encode())
            # A marker behind them on down/sync (one publisher, one topic, QoS 1: in
            # order, v5 §4.6): an answer the device rejects, and says so.
            await cloud.send_raw(agent.device_id, "sync", b"not a sync answer")
            name, rejected = await agent.next_command()
            assert (name, type(rejected)) == ("sync", CommandRejected)
            assert transport.stats.connects == 2
            assert not transport.synced.is_set()
            cloud.answer_held(mine[0])  # this connection's first request, after it asked again
            async with asyncio.timeout(5):
                await transport.synced.wait()
        finally:
            await agent.stop()


async def test_a_command_whose_effect_cannot_be_written_is_delivered_again(
    make_agent: MakeAgent, cloud: Cloud
) -> None:
    agent = make_agent()
    core = agent.open()
    core.bind("b-1", now=time.time() - 60)
    core.grant(Purpose.DIAGNOSTICS, now=time.time() - 60)
    real_take = core.take
    failures: list[str] = []

    def flaky_take(command: Any, *, now: float) -> Any:
        if not failures:
            failures.append(command.command_id)
            raise StorageError("disk full")  # nothing was written
        return real_take(command, now=now)

    core.take = flaky_take  # type: ignore[method-assign]
    transport = agent.start()
    try:
        await agent.synced()
        off = {"binding_id": "b-1", "purposes": {"diagnostics": False}, "policy_version": "1"}
        command_id = await cloud.command(agent.device_id, "consent", off)
        # Not acknowledged: the session ends and the broker delivers it again.
        assert await agent.next_command() == ("consent", {"consent:diagnostics": "applied"})
        assert failures == [command_id]
        await agent.connected()  # the command may be taken before the CONNACK is done with
        assert transport.stats.connects == 2
        assert not core.decide(Purpose.DIAGNOSTICS).allowed
        await agent.idle()
        # A marker behind it on the same topic: a command the device rejects. Had the
        # broker still held the consent for the device, it would come first (v5 §4.6).
        await cloud.send_raw(agent.device_id, "consent", b"not a command")
        name, rejected = await agent.next_command()
        assert (name, type(rejected)) == ("consent", CommandRejected)  # applied exactly once
        withdrawals = [
            e for e in core.export(now=time.time())["entries"] if e.get("action") == "withdraw"
        ]
        assert len(withdrawals) == 1
    finally:
        await agent.stop()


def _wait_until_readable(agent: Agent, within: float = 10.0) -> None:
    """Block (the event loop too) until the device's socket holds unread bytes."""
    assert agent.transport is not None
    conn = agent.transport._conn  # the live connection (test only)
    assert isinstance(conn, mqtt.Connection)  # the adapter's, not a fake
    sock = conn._paho.socket()  # paho's TLS socket (test only)
    assert isinstance(sock, socket.socket)
    readable, _, _ = select.select([sock], [], [], within)
    assert readable, "the broker did not deliver the command to the device's socket"


async def test_a_narrowing_command_on_the_socket_is_taken_before_anything_else_leaves(
    make_agent: MakeAgent, cloud: Cloud, broker: MosquittoBroker, pki: DevPki
) -> None:
    """The suspension is on the device's socket, unread, when crashes are captured (the
    event loop was busy): nothing captured after it arrived may be handed over."""
    agent = make_agent()
    core = agent.open()
    core.bind("b-1", now=time.time() - 60)
    core.grant(Purpose.DIAGNOSTICS, now=time.time() - 60)
    agent.start()
    app = PahoClient(broker, pki.ca_cert, pki.backend_consumer(1), backend_id(1))
    app.connect()  # another cloud worker, on a thread of its own
    try:
        await agent.synced()
        await agent.idle()
        doc = {"command_id": "c-on-the-socket", "issued_at": rfc3339(time.time())}
        # Holding this event loop (the device's) from here until the captures are done.
        topic = f"smartmi/v1/{agent.device_id}/down/suspend-collection"
        assert app.publish(topic, json.dumps(doc).encode()).value == 0
        _wait_until_readable(agent)
        captured = {core.capture_crash(crash(k), now=time.time()) for k in range(20)}
        assert await agent.next_command() == ("suspend-collection", {"suspension": "applied"})
        await agent.idle()
        assert not captured & {m.msg_id for m in await before_marker(agent, cloud)}
    finally:
        app.close()
        await agent.stop()


async def test_a_command_whose_cloud_connection_broke_before_its_puback_still_arrives(
    make_agent: MakeAgent, broker: MosquittoBroker, pki: DevPki
) -> None:
    """The cloud's connection to its node breaks while a command is on its way (a node
    killed on a cluster): the cloud sends it again on its next connection, as a real
    cloud keeps a command until the broker has it, and says when that send began."""
    proxy = FaultProxy(broker.host, broker.port, random.Random(7))
    await proxy.start()
    agent = make_agent()
    try:
        async with Cloud(broker.host, proxy.port, pki).connected() as cloud:
            core = agent.open()
            core.bind("b-1", now=time.time())
            core.grant(Purpose.DIAGNOSTICS, now=time.time())
            agent.start()
            await agent.synced()
            proxy.latency_s = 1.0  # what the cloud writes now reaches the broker in 1 s
            issued = time.time()
            off = {"binding_id": "b-1", "policy_version": "1", "purposes": {"diagnostics": False}}
            _command_id, sending = cloud.issue(agent.device_id, "consent", off)
            await asyncio.sleep(0.2)  # the PUBLISH is inside the proxy, not yet at the broker
            proxy.cut()  # ...and never gets there: the cloud's connection is gone
            proxy.latency_s = 0.0
            began = await sending  # a failed send raised here, and the command was lost
            assert issued <= began <= time.time()
            name, result = await agent.next_command()
            while name != "consent":
                name, result = await agent.next_command()
            assert isinstance(result, dict)
            assert "applied" in result.values(), result
            assert not core.decide(Purpose.DIAGNOSTICS).allowed
    finally:
        await agent.stop()
        await proxy.close()
