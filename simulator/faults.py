"""A loopback TCP proxy per device group that can delay, slow and cut its connections.

Devices of a group connect to their proxy instead of the broker; the TLS session
runs end to end through it (the proxy sees only ciphertext). Faults:

* latency: every chunk is forwarded ``latency_s`` after it was read, both ways. The
  delay is a pipeline, as on a long link: chunks are read as they come and each one
  waits out its own delay beside the others, so a trip takes ``latency_s``, not that
  times the number of chunks ahead of it;
* loss: a chunk is late by a retransmission timeout with probability ``loss``
  (TCP does not lose bytes; a lossy path makes them late), and holds up the chunks
  behind it (TCP delivers in order);
* partition: open connections are cut and new ones refused until it heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class FaultProxy:
    """One group's path to the broker."""

    RETRANSMIT_S = 0.2
    # Chunks read but not yet forwarded, per direction of a connection: a full pipeline
    # stops reading, as a full TCP window would (at most 16 MiB of 64 KiB reads).
    PIPELINE_CHUNKS = 256

    def __init__(self, target_host: str, target_port: int, rng: random.Random) -> None:
        self.target = (target_host, target_port)
        self.rng = rng
        self.latency_s = 0.0
        self.loss = 0.0
        self.partitioned = False
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    def cut(self) -> None:
        """Close every open connection now."""
        for writer in list(self._conns):
            writer.transport.abort()
        self.cuts += len(self._conns)
        self._conns.clear()

    def partition(self, on: bool) -> None:
        """Cut the group off (and refuse new connections) or heal it."""
        self.partitioned = on
        if on:
            self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.partitioned:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Read ``src`` as it comes; ``_deliver`` writes each chunk to ``dst`` when due."""
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self.PIPELINE_CHUNKS)
        deliver = asyncio.create_task(self._deliver(line, dst))
        due = 0.0
        try:
            while (data := await src.read(65536)) and not deliver.done():
                delay = self.latency_s
                if self.loss and self.rng.random() < self.loss:
                    delay += self.RETRANSMIT_S
                # In order: never before the chunk ahead of it.
                due = max(due, loop.time() + delay)
                await line.put((due, data))
            await line.put(None)  # the end: what is on its way still arrives, then close
            await deliver
        except (ConnectionError, OSError):
            pass
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliver

    async def _deliver(
        self, line: asyncio.Queue[tuple[float, bytes] | None], dst: asyncio.StreamWriter
    ) -> None:
        """Write each chunk from ``line`` at its due time, in order; close ``dst`` at the
        end, on a partition or when it fails (the other direction then ends too)."""
        loop = asyncio.get_running_loop()
        try:
            while (item := await line.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if self.partitioned:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(dst)
            dst.transport.abort()
            while not line.empty():  # a reader waiting for room goes on, and sees the end
                line.get_nowait()
