"""The hand-off needs no recall (P2, P11), tried against a TLS peer that stops reading.

The peer speaks just enough MQTT v5 to let the device connect, subscribe and sync
(CONNACK, SUBACK, a PUBACK and the sync answer), then stops reading: the socket
buffers fill and paho is left holding bytes it cannot write. A withdrawal then must
stop what has not left (the connection is aborted before those bytes are written),
and every PUBLISH that did reach the peer must be in the device's ledger.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.core.purposes import Purpose, rfc3339
from agent.device import CoreConfig, CrashReport, Device, build_device
from agent.runtime import mqtt
from agent.runtime.target import BrokerTarget
from agent.runtime.tls import client_context
from agent.runtime.transport import Transport
from agent.store.database import Database
from agent.store.keys import FileKeyStore
from simulator.pki import DevPki

pytestmark = pytest.mark.asyncio

DEVICE = "stall-dev-1"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packets(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Complete MQTT packets (type byte, body) in ``data``, and the incomplete rest."""
    out, pos = [], 0
    while pos < len(data):
        length, mult, i = 0, 1, pos + 1
        while i < len(data):
            length += (data[i] & 0x7F) * mult
            mult *= 128
            i += 1
            if not data[i - 1] & 0x80:
                break
        else:
            break
        if i + length > len(data):
            break
        out.append((data[pos], data[i : i + length]))
        pos = i + length
    return out, data[pos:]


def _publish_fields(first: int, body: bytes) -> tuple[str, int, bytes]:
    """(topic, packet id, payload) of a v5 PUBLISH."""
    tlen = int.from_bytes(body[:2], "big")
    topic = body[2 : 2 + tlen].decode()
    pos = 2 + tlen
    pid = 0
    if first & 0x06:
        pid = int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
    plen, mult = 0, 1
    while True:  # the properties' length
        byte = body[pos]
        pos += 1
        plen += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            break
    return topic, pid, body[pos + plen :]


@dataclass
class StalledPeer:
    """A TLS MQTT v5 'broker' that serves one connection, then stops reading."""

    pki: DevPki
    port: int = 0
    stalled: threading.Event = field(default_factory=threading.Event)
    drain: threading.Event = field(default_factory=threading.Event)
    published: list[tuple[str, bytes]] = field(default_factory=list)  # complete PUBLISHes
    partial: int = 0  # bytes of an incomplete packet at the end of the stream

    def start(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki.broker.cert, self.pki.broker.key)
        ctx.load_verify_locations(self.pki.ca_cert)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._listener = socket.create_server(("127.0.0.1", 0))
        # A small receive buffer, inherited by the accepted socket: it fills quickly.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.port = self._listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, args=(ctx,), daemon=True)
        self.thread.start()

    def _serve(self, ctx: ssl.SSLContext) -> None:
        raw, _ = self._listener.accept()
        self._listener.close()  # one connection only: reconnects are refused
        with ctx.wrap_socket(raw, server_side=True) as sock:
            sock.settimeout(20)
            buf, synced = b"", False
            while not synced:
                buf += sock.recv(65536)
                packets, buf = _packets(buf)
                for first, body in packets:
                    kind = first >> 4
                    if kind == 1:  # CONNECT
                        sock.sendall(b"\x20\x03\x00\x00\x00")
                    elif kind == 8:  # SUBSCRIBE
                        sock.sendall(b"\x90\x04" + body[:2] + b"\x00\x01")
                    elif kind == 3:  # PUBLISH: the sync request
                        topic, pid, payload = _publish_fields(first, body)
                        sock.sendall(b"\x40\x02" + pid.to_bytes(2, "big"))
                        if topic.endswith("/up/sync"):
                            answer = json.dumps(
                                {
                                    "sync_id": json.loads(payload)["sync_id"],
                                    "now": rfc3339(time.time()),
                                }
                            ).encode()
                            down = f"smartmi/v1/{DEVICE}/down/sync".encode()
                            body_out = (
                                len(down).to_bytes(2, "big") + down + b"\x00\x01" + b"\x00" + answer
                            )
                            sock.sendall(b"\x32" + _varint(len(body_out)) + body_out)
                            synced = True
            self.stalled.set()
            self.drain.wait(30)  # not reading: the device's writes back up
            sock.settimeout(5)
            data = buf
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except (OSError, TimeoutError):
                pass
            packets, rest = _packets(data)
            self.published = [
                (_publish_fields(f, b)[0], _publish_fields(f, b)[2])
                for f, b in packets
                if f >> 4 == 3
            ]
            self.partial = len(rest)


def _open_device(root: Path) -> Device:
    db = Database(root / "state.db", synchronous="NORMAL")
    config = CoreConfig(device_id=DEVICE, serial="SN", model="m", firmware_version="1.0.0")
    return build_device(db, FileKeyStore(root / "keys"), config, now=time.time() - 60)


@pytest.mark.slow
async def test_a_withdrawal_under_backpressure_stops_what_has_not_left(
    tmp_path: Path, pki: DevPki
) -> None:
    peer = StalledPeer(pki)
    peer.start()
    device = _open_device(tmp_path)
    now = time.time() - 60
    device.bind("b-1", now=now)
    device.grant(Purpose.DIAGNOSTICS, now=now)
    deep = "/".join("part_" + "x" * k + "_" + "y" * 40 for k in range(1, 13))  # long names
    stack = "".join(f'  File "{deep}/m{n}.py", line {n}, in handler\n' for n in range(64))
    with device.store.db.transaction():
        ids = {
            device.capture_crash(CrashReport(f"sig {n}", stack), now=time.time())
            for n in range(300)
        }
    ident = pki.ensure_devices([DEVICE])[DEVICE]
    target = BrokerTarget(
        "127.0.0.1", peer.port, client_context(pki.ca_cert, ident.cert, ident.key)
    )
    transport = Transport(device, target, window=300)
    task = asyncio.create_task(transport.run())
    try:
        async with asyncio.timeout(20):
            await transport.synced.wait()
            # Full with our items, not just the acknowledgement of the sync answer.
            while not (transport.backpressured and transport.stats.published):  # noqa: ASYNC110  # a socket, nothing to await
                await asyncio.sleep(0.01)
        handed = transport.stats.published
        assert 0 < handed < 300  # the peer stopped reading: paho holds unwritten bytes
        device.withdraw(Purpose.DIAGNOSTICS, now=time.time())
        assert transport.stats.aborted == 1  # it had not left: the connection is cut first
        async with asyncio.timeout(20):
            while transport.connected.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert transport.stats.published == handed  # nothing more after the withdrawal
        peer.drain.set()
        await asyncio.to_thread(peer.thread.join, 20)
    finally:
        transport.stop(task)
        with pytest.raises(asyncio.CancelledError):
            await task
    arrived = {json.loads(p)["msg_id"] for t, p in peer.published if t.endswith("/up/crash")}
    sent = {
        e["msg_id"]: e["confirmed"]
        for e in device.export(now=time.time())["entries"]
        if e["type"] == "sent"
    }
    # Whatever reached the network is in the user's record (P11), unconfirmed: no PUBACK.
    assert arrived <= set(sent)
    assert not any(sent.values())
    assert arrived <= ids
    assert len(arrived) < handed  # the item paho was still writing never arrived whole
    assert device.queued_count() == 0  # the rest was deleted unsent (P2)
    device.store.db.close()


async def test_a_full_socket_is_awaited_the_adapter_says_when_it_took_the_last_bytes(
    pki: DevPki,
) -> None:
    """``on_writable`` is the word the drain awaits instead of looking again: it comes
    once the peer reads again and paho has written everything it held, not before."""
    peer = StalledPeer(pki)
    peer.start()
    ident = pki.ensure_devices([DEVICE])[DEVICE]
    options = mqtt.Options(
        "127.0.0.1",
        peer.port,
        client_context(pki.ca_cert, ident.cert, ident.key),
        DEVICE,
        max_inflight=10_000,  # every PUBLISH is written at once, none held in paho's queue
    )
    writable = asyncio.Event()
    payload = b"x" * 60_000
    async with mqtt.connect(options, on_puback=lambda _ack: None, on_writable=writable.set) as conn:
        conn.publish_nowait(f"smartmi/v1/{DEVICE}/up/sync", json.dumps({"sync_id": "s"}).encode())
        assert await asyncio.to_thread(peer.stalled.wait, 15)  # the peer reads no more
        async with asyncio.timeout(30):
            # Full for good: the kernel grows a socket's send buffer for a while, and
            # each time paho writes all it held again (and says so) until it cannot.
            while True:
                while not conn.pending_write():
                    conn.publish_nowait(f"smartmi/v1/{DEVICE}/up/crash", payload)
                    conn.flush()
                writable.clear()
                await asyncio.sleep(0.5)  # the loop runs; the writer waits on the socket
                if conn.pending_write():
                    break
        # No marker can pass a peer that reads nothing: the half second the loop ran
        # with the socket full is what bounds this.
        assert not writable.is_set()  # no word while the socket stays full
        peer.drain.set()  # the peer reads again
        await asyncio.wait_for(writable.wait(), 15)
        assert not conn.pending_write()
    await asyncio.to_thread(peer.thread.join, 20)
