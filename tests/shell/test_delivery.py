"""Delivered means delivered (SPEC §3): a v5 PUBACK 0x10 for personal data is no delivery."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import pytest

from agent.core.identity import down_filter, up_topic
from agent.core.purposes import Purpose, rfc3339
from agent.device import CrashReport
from agent.runtime.target import BrokerTarget
from agent.runtime.transport import Transport
from tests.device.helpers import Rig
from tests.shell.fake_broker import FakeBroker

pytestmark = pytest.mark.asyncio


async def test_no_matching_subscribers_leaves_personal_data_queued(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    core = rig.open()
    core.bind("b", now=rig.tick())
    core.grant(Purpose.DIAGNOSTICS, now=rig.tick())
    core.capture_crash(CrashReport("s", "x"), now=rig.tick())  # wiped with the owner
    request = core.unbind(now=rig.tick())  # a deletion request is not personal data
    core.bind("b2", now=rig.tick())
    core.grant(Purpose.DIAGNOSTICS, now=rig.tick())
    crash = core.capture_crash(CrashReport("s", "x"), now=rig.tick())
    broker = FakeBroker()
    transport = Transport(
        core,
        BrokerTarget("127.0.0.1", 1, ssl.create_default_context()),
        clock=lambda: rig.now,
        connector=broker,
    )
    device = core.device_id
    task = asyncio.create_task(transport.run())
    try:
        link = await broker.connection()
        _, body = await link.publish_to(up_topic(device, "sync"))
        answer = {"sync_id": json.loads(body)["sync_id"], "now": rfc3339(rig.now)}
        link.deliver(down_filter(device).removesuffix("+") + "sync", json.dumps(answer).encode())
        handed = [await link.publish_to(up_topic(device, k)) for k in ("deletion-request", "crash")]
        assert [json.loads(body)["msg_id"] for _, body in handed] == [request, crash]
        for mid, _ in handed:
            link.puback(mid, 0x10, "No matching subscribers")
        assert core.queued_count() == 1  # the crash waits to be sent again
        assert core.in_flight() == []
        assert core.store.deletion_requests() == []  # the broker has the deletion request
        assert transport.stats.refused == 1
        assert transport.stats.last_error_kind == "no-subscribers"
        sent = [e for e in core.export(now=rig.now)["entries"] if e["type"] == "sent"]
        assert sent == []  # not in the record as delivered
    finally:
        transport.stop(task)
        with pytest.raises(asyncio.CancelledError):
            await task
