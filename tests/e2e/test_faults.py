"""The fault proxy over real loopback sockets: latency is a pipeline delay (a trip takes
the configured latency however many chunks are on their way), order is kept, and a
late (lossy) chunk holds up the ones behind it, as TCP would."""

from __future__ import annotations

import asyncio
import random

import pytest

from simulator.faults import FaultProxy

pytestmark = pytest.mark.asyncio

LATENCY_S = 0.3
CHUNKS = 8
GAP_S = 0.05  # between two writes: each one is a read of its own at the proxy
# The event loop's own scheduling on a busy 2-core machine; far below one latency.
SLACK_S = 0.12


async def trip(proxy: FaultProxy) -> list[tuple[int, float]]:
    """Send CHUNKS one-byte chunks through ``proxy`` GAP_S apart; for each byte that
    arrives at the far side, in arrival order: its index and how long it took."""
    arrived: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64):
            for byte in data:
                arrived.put_nowait((byte, loop.time()))
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    proxy.target = ("127.0.0.1", server.sockets[0].getsockname()[1])
    await proxy.start()
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        sent = []
        for i in range(CHUNKS):
            sent.append(loop.time())
            writer.write(bytes([i]))
            await writer.drain()
            await asyncio.sleep(GAP_S)
        got = [await asyncio.wait_for(arrived.get(), 10) for _ in range(CHUNKS)]
        writer.close()
        return [(i, at - sent[i]) for i, at in got]
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def test_latency_delays_each_chunk_once_not_behind_the_others() -> None:
    proxy = FaultProxy("127.0.0.1", 0, random.Random(1))
    proxy.latency_s = LATENCY_S
    got = await trip(proxy)
    assert [i for i, _ in got] == list(range(CHUNKS))  # in order
    # Serially, the last chunk would have waited for the 7 ahead of it: about 1 s more.
    for i, took in got:
        assert LATENCY_S - 0.01 <= took <= LATENCY_S + SLACK_S, (i, took)


async def test_a_late_chunk_holds_up_the_ones_behind_it_in_order() -> None:
    proxy = FaultProxy("127.0.0.1", 0, random.Random(1))
    proxy.latency_s = LATENCY_S
    late = iter([0.9, 0.9, 0.0] + [0.9] * CHUNKS)  # below the loss rate: the third read
    proxy.rng.random = lambda: next(late)  # type: ignore[method-assign]
    proxy.loss = 0.5
    got = await trip(proxy)
    assert [i for i, _ in got] == list(range(CHUNKS))
    took = dict(got)
    for i in (0, 1):
        assert LATENCY_S - 0.01 <= took[i] <= LATENCY_S + SLACK_S, (i, took[i])
    # Chunk 2 is late by a retransmission; 3 is not, but arrives only after 2.
    late_s = LATENCY_S + FaultProxy.RETRANSMIT_S
    assert late_s - 0.01 <= took[2] <= late_s + SLACK_S
    assert took[3] >= took[2] - GAP_S - 0.01
