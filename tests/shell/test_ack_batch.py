"""Acknowledgements batched across devices: one transaction, a failure undoes only itself,
and a PUBACK for an item the device forgot is still heard of."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from agent.core.purposes import Purpose
from agent.device import CrashReport, Device
from agent.errors import StorageError
from agent.runtime.target import BrokerTarget
from agent.runtime.transport import Transport
from simulator.acks import AckBatch
from tests.device.helpers import Rig

pytestmark = pytest.mark.asyncio


def _three_in_flight(tmp_path: Path) -> tuple[Rig, Device, list[str]]:
    """A bound device with diagnostics granted and three crashes handed to the wire."""
    rig = Rig(tmp_path)
    core = rig.open()
    core.bind("b", now=rig.now)
    core.grant(Purpose.DIAGNOSTICS, now=rig.now)
    ids = [core.capture_crash(CrashReport(f"s{n}", "x"), now=rig.now) for n in range(3)]
    assert [o.msg_id for o in core.next_batch(now=rig.now)] == ids
    return rig, core, ids


async def test_a_failed_acknowledgement_is_undone_alone(tmp_path: Path) -> None:
    rig, core, ids = _three_in_flight(tmp_path)
    batch = AckBatch(core.store.db)
    transport = Transport(
        core, BrokerTarget("127.0.0.1", 1, ssl.create_default_context()), ack_sink=batch.add
    )
    real = core.store.acknowledge

    def flaky(msg_id: str, ledger_entry: dict[str, Any]) -> bool:
        result = real(msg_id, ledger_entry)  # its statements run, then it fails
        if msg_id == ids[1]:
            raise StorageError("disk full")
        return result

    core.store.acknowledge = flaky  # type: ignore[method-assign]
    for msg_id in ids:
        batch.add(transport, msg_id, rig.now)
    await asyncio.sleep(0)  # the batch is written on the next loop iteration
    core.store.acknowledge = real  # type: ignore[method-assign]
    assert core.store.msg_ids() == [ids[1]]  # undone alone: still queued
    sent = [e["msg_id"] for e in core.export(now=rig.now)["entries"] if e["type"] == "sent"]
    assert sent == [ids[0], ids[2]]
    assert core.storage_status()["acknowledgements_not_recorded"] == 1
    # It reached the broker: it is recorded when the store takes writes, not sent again.
    assert core.next_batch(now=rig.now) == []
    assert core.store.msg_ids() == []
    sent = [e["msg_id"] for e in core.export(now=rig.now)["entries"] if e["type"] == "sent"]
    assert sent == [ids[0], ids[2], ids[1]]
    assert core.storage_status()["ok"]


async def test_a_puback_for_an_item_a_wipe_forgot_is_passed_on(tmp_path: Path) -> None:
    rig, core, ids = _three_in_flight(tmp_path)
    forgotten: list[tuple[str, float]] = []
    batch = AckBatch(core.store.db, forgotten=lambda _t, m, at: forgotten.append((m, at)))
    transport = Transport(
        core, BrokerTarget("127.0.0.1", 1, ssl.create_default_context()), ack_sink=batch.add
    )
    batch.add(transport, ids[0], rig.now + 1)
    await asyncio.sleep(0)  # the batch is written on the next loop iteration
    assert forgotten == []  # the device knew it: its own record, not this one
    batch.add(transport, ids[1], rig.now + 2)  # the PUBACK came before the wipe ...
    core.unbind(now=rig.now + 2.5)  # ... which forgets both in flight before the batch
    batch.add(transport, ids[2], rig.now + 3)
    await asyncio.sleep(0)
    assert forgotten == [(ids[1], rig.now + 2), (ids[2], rig.now + 3)]
