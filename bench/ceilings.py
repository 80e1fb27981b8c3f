"""The ceilings (and floors) the fleet and daemon figures are measured against, each in
the same run on the same broker as the figure it bounds:

* connect rate: six ``openssl s_time -new`` processes in parallel, each doing full
  mutual-TLS handshakes with a device certificate for 5 s; their connections over
  those 5 s of wall time (``s_time_ceiling``);
* throughput, bare: one paho client publishing QoS 1 with the agent's window in flight,
  and nothing else (``qos1_ceiling`` without a store), while a backend consumer in
  another process receives each message (``backend_sink``), as the simulated cloud
  receives the agents';
* throughput, the same work: the same loop doing per message what the agent must do
  and nothing more: seal the payload with AES-GCM, insert it at the agent's durability
  setting, publish it, take the PUBACK, insert a sealed ledger row and delete the
  outbox row (``qos1_ceiling`` with a ``SameWork`` store);
* memory per device: a mutual-TLS connection held open with its own context, certificate
  and key, in a process of its own (``tls_memory_floor``);
* the daemon: a process that imports what the daemon must (paho, cryptography, sqlite3)
  and connects one paho client over mutual TLS (``bare_daemon``, the process being
  ``python -m bench.ceilings client``).

Only this module of the benchmark imports paho (the import contract in pyproject.toml).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:  # not imported at run time: the bare client's process stays bare
    from simulator.broker import MosquittoBroker
    from simulator.pki import DevPki

NONCE_BYTES = 12  # as the agent's vault
SINK_BACKEND = 8  # the backend consumer the ceilings' sink connects as (not the cloud's)


def s_time_ceiling(
    broker: MosquittoBroker, pki: DevPki, seconds: int = 5, procs: int = 6
) -> dict[str, float]:
    """Mutual-TLS handshakes per second of wall time from ``procs`` parallel
    ``openssl s_time -new`` (``per_s``), and the figure used before (``per_user_s``).

    ``per_s`` is every connection made over the ``seconds`` each process runs at least,
    so if anything it is high. ``per_user_s`` sums each process's "connections/user
    sec": handshakes per second of its own user CPU time. That is a cost, not a rate
    the machine reaches: it leaves out the kernel's and the broker's share and grows with
    the number of processes (on 2 cores, 966/s with one, 5,323/s with six, while the
    wall rate went from 381/s to 684/s).
    """
    ident = pki.ensure_devices(["bench-s-time"])["bench-s-time"]
    cmd = [
        "openssl", "s_time", "-connect", f"{broker.host}:{broker.port}", "-new",
        "-time", str(seconds), "-cert", str(ident.cert), "-key", str(ident.key),
        "-CAfile", str(pki.ca_cert),
    ]  # fmt: skip
    runs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(procs)
    ]
    connections, per_user_s = 0, 0.0
    for proc in runs:
        out, _ = proc.communicate(timeout=seconds + 30)
        m = re.search(r"(\d+) connections in ([\d.]+)s", out)
        if m is None:
            raise RuntimeError(f"openssl s_time printed no rate:\n{out[-500:]}")
        connections += int(m.group(1))
        per_user_s += int(m.group(1)) / float(m.group(2))
    return {"per_s": connections / seconds, "per_user_s": per_user_s}


@dataclass
class SameWork:
    """Per message, what the agent must store and nothing else, on one SQLite file with
    the agent's own connection settings (``agent.store.database.Database``: WAL,
    ``secure_delete``, and the fleet's ``synchronous=NORMAL``), in bare tables.

    The writes of one turn of the loop share a commit, as the agent's do under the
    benchmark (its producer captures 200 items a transaction, and the fleet writes the
    PUBACKs of a loop turn together: ``simulator.acks``).
    """

    path: Path
    payload: bytes  # what is published: the agent's item, as many bytes
    ledger_bytes: int  # the JSON of the agent's "sent" ledger entry, as many bytes
    conn: sqlite3.Connection = field(init=False)
    _aead: AESGCM = field(init=False)

    def __post_init__(self) -> None:
        from agent.store.database import Database

        self.conn = Database(self.path, synchronous="NORMAL").conn
        self.conn.executescript(
            "CREATE TABLE bench_outbox (seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL, "
            "blob BLOB NOT NULL);"
            "CREATE TABLE bench_ledger (seq INTEGER PRIMARY KEY, blob BLOB NOT NULL);"
        )
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def _seal(self, plain: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plain, aad)

    def queue(self, n: int) -> list[int]:
        """Seal and insert ``n`` items in one commit; their rows."""
        rows: list[int] = []
        self.conn.execute("BEGIN IMMEDIATE")
        for _ in range(n):
            msg_id = uuid.uuid4().hex
            cur = self.conn.execute(
                "INSERT INTO bench_outbox (msg_id, blob) VALUES (?, ?)",
                (msg_id, self._seal(self.payload, msg_id.encode())),
            )
            rows.append(cur.lastrowid or 0)
        self.conn.execute("COMMIT")
        return rows

    def acknowledged(self, rows: list[int]) -> None:
        """Ledger each acknowledged item (a sealed row) and delete it, in one commit."""
        entry = os.urandom(self.ledger_bytes)
        self.conn.execute("BEGIN IMMEDIATE")
        for row in rows:
            self.conn.execute(
                "INSERT INTO bench_ledger (blob) VALUES (?)", (self._seal(entry, b"%d" % row),)
            )
            self.conn.execute("DELETE FROM bench_outbox WHERE seq = ?", (row,))
        self.conn.execute("COMMIT")


def qos1_ceiling(
    broker: MosquittoBroker,
    pki: DevPki,
    *,
    window: int,
    payload: bytes,
    seconds: float = 5.0,
    work: SameWork | None = None,
) -> dict[str, float]:
    """QoS 1 PUBLISH+PUBACK per second from one paho client with ``window`` in flight,
    driven on one thread by paho's own ``loop`` as the agent is by its event loop; with
    ``work``, each message is also sealed and stored before it is published, and
    ledgered and deleted when its PUBACK arrives. The rate, and the process's CPU per
    message."""
    from agent.runtime.tls import client_context

    device = "bench-same-work" if work else "bench-paho"
    ident = pki.ensure_devices([device])[device]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    client.tls_set_context(client_context(pki.ca_cert, ident.cert, ident.key))
    client.max_inflight_messages_set(window)
    acked: list[int] = []
    refused: list[int] = []

    def on_publish(_c: object, _u: object, mid: int, code: ReasonCode, _p: object) -> None:
        # 0x10, no matching subscribers, is taken too: the backend's sink may be late.
        (refused if code.is_failure else acked).append(mid)

    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {device} ceiling client did not connect")
        client.loop(0.1)
    topic = f"smartmi/v1/{device}/up/crash"
    flying: dict[int, int] = {}  # paho's mid -> the outbox row
    done = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        room = window - len(flying)
        if room:
            for row in work.queue(room) if work else [0] * room:
                flying[client.publish(topic, payload, qos=1).mid] = row
        client.loop(1.0)
        if refused:
            raise RuntimeError(f"the broker refused a PUBLISH of the {device} ceiling")
        if acked:
            rows = [flying.pop(mid) for mid in acked]
            acked.clear()
            if work:
                work.acknowledged(rows)
            done += len(rows)
    took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    client.disconnect()
    if work:
        work.conn.close()
    return {"msgs_per_s": done / took, "cpu_us_per_msg": 1e6 * cpu / max(1, done)}


@contextlib.contextmanager
def backend_sink(broker: MosquittoBroker, pki: DevPki) -> Iterator[dict[str, float]]:
    """A backend consumer in a process of its own, subscribed to every device's uplink
    at QoS 1 while the block runs: the broker routes and the machine receives each
    message of a ceiling, as they do each of the agents' for the simulated cloud. After
    the block, the dict it gave holds the messages it received and its CPU seconds."""
    from agent.core.identity import UP_FILTER_ALL, backend_id

    ident = pki.backend_consumer(SINK_BACKEND)
    at = Endpoint(broker.host, broker.port, str(pki.ca_cert), str(ident.cert), str(ident.key))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ceilings", "sink", *at.argv(), "--client-id",
         backend_id(SINK_BACKEND), "--topic", UP_FILTER_ALL],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None  # noqa: S101
    if proc.stdout.readline().strip() != "subscribed":
        proc.kill()
        raise RuntimeError("the ceilings' backend sink did not subscribe")
    got: dict[str, float] = {}
    try:
        yield got
    finally:
        out, _ = proc.communicate("", timeout=30)  # stdin closed: it disconnects and ends
        messages, cpu_s = out.split()
        got.update(messages=int(messages), cpu_s=float(cpu_s))


class Endpoint(NamedTuple):
    """Where a floor's process connects, and as whom (files of the dev PKI)."""

    host: str
    port: int
    ca: str
    cert: str
    key: str

    @classmethod
    def of(cls, broker: MosquittoBroker, pki: DevPki, device: str) -> Endpoint:
        """The broker's address, with ``device``'s certificate and key."""
        ident = pki.ensure_devices([device])[device]
        return cls(broker.host, broker.port, str(pki.ca_cert), str(ident.cert), str(ident.key))

    def argv(self) -> list[str]:
        """As the command line of ``python -m bench.ceilings`` takes it."""
        return [self.host, str(self.port), self.ca, self.cert, self.key]

    def context(self) -> ssl.SSLContext:
        """As ``agent.runtime.tls.client_context`` makes it, without the agent's imports."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=self.ca)
        ctx.load_cert_chain(certfile=self.cert, keyfile=self.key)
        return ctx


def tls_memory_floor(broker: MosquittoBroker, pki: DevPki, n: int = 1000) -> float:
    """KiB of resident memory per mutual-TLS connection held open, each with its own
    context loaded with the certificate and key (as each agent's is), in a process of
    its own that imports nothing else; the per-device floor of a fleet's memory."""
    at = Endpoint.of(broker, pki, "bench-tls-floor")
    out = subprocess.run(
        [sys.executable, "-m", "bench.ceilings", "tls-memory", *at.argv(), str(n)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.split()[-1])


def bare_daemon(broker: MosquittoBroker, pki: DevPki) -> dict[str, float]:
    """A process that imports what the daemon must and connects one paho client over
    mutual TLS: its start to CONNACK, and its resident memory once connected."""
    from simulator.broker import memory_kib

    at = Endpoint.of(broker, pki, "bench-bare-daemon")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ceilings", "client", *at.argv()],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None  # noqa: S101
    line = proc.stdout.readline()
    start = time.monotonic() - t0
    if line.strip() != "connected":
        proc.kill()
        raise RuntimeError(f"the bare daemon did not connect: {line!r}")
    time.sleep(1.0)  # as the daemon's figure, taken after a while connected
    resident = memory_kib(proc.pid)
    proc.communicate("", timeout=30)  # stdin closed: it disconnects and ends
    return {"rss_mb": resident / 1024, "start_to_connected_s": start}


def _tls_memory(at: Endpoint, n: int) -> float:
    import socket

    from simulator.broker import memory_kib

    def connected() -> ssl.SSLSocket:
        sock = socket.create_connection((at.host, at.port))
        return at.context().wrap_socket(sock, server_hostname=at.host)

    held = [connected()]  # the first one's one-off costs are not a device's
    before = memory_kib()
    held += [connected() for _ in range(n)]
    per = (memory_kib() - before) / n
    for s in held:
        s.close()
    return per


def _client(at: Endpoint) -> None:
    # What the daemon cannot do without, loaded as it loads them: sealing and its store.
    AESGCM(AESGCM.generate_key(bit_length=256))
    sqlite3.connect(":memory:").execute("PRAGMA journal_mode = WAL")
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-bare-daemon", protocol=mqtt.MQTTv5
    )
    client.tls_set_context(at.context())
    client.on_connect = lambda *_a: print("connected", flush=True)
    client.connect(at.host, at.port)
    client.loop_start()
    sys.stdin.read()  # until the benchmark closes it
    client.disconnect()
    client.loop_stop()


def _sink(at: Endpoint, client_id: str, topic: str) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(at.context())
    received = [0]
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_a: print("subscribed", flush=True)
    client.on_message = lambda *_a: received.__setitem__(0, received[0] + 1)
    client.connect(at.host, at.port)
    client.loop_start()
    sys.stdin.read()  # until the benchmark closes it
    client.disconnect()
    client.loop_stop()
    print(received[0], time.process_time(), flush=True)


def main() -> int:
    """The processes of the ceilings: ``tls-memory HOST PORT CA CERT KEY N`` prints the
    KiB per connection; ``client HOST PORT CA CERT KEY`` prints ``connected`` on its
    CONNACK; ``sink HOST PORT CA CERT KEY --client-id ID --topic FILTER`` prints
    ``subscribed`` on its SUBACK; the last two run until their stdin is closed, when the
    sink prints the messages it received and its CPU seconds."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceilings")
    parser.add_argument("mode", choices=("tls-memory", "client", "sink"))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("ca")
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("n", type=int, nargs="?", default=1000)
    parser.add_argument("--client-id", default="")
    parser.add_argument("--topic", default="")
    args = parser.parse_args()
    at = Endpoint(args.host, args.port, args.ca, args.cert, args.key)
    if args.mode == "tls-memory":
        print(f"{_tls_memory(at, args.n):.2f}")
    elif args.mode == "sink":
        _sink(at, args.client_id, args.topic)
    else:
        _client(at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
