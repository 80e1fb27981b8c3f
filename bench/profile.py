"""Where fleet start spends its CPU: ``python -m bench.profile [--devices N]``.

Starts a Mosquitto of its own, then runs a fleet start (N agents connect, each with
its activation acknowledged, as in the benchmark) under py-spy. The process's CPU over
the start alone (from the moment the fleet is built to the last acknowledgement) comes
from ``/proc/self/task``, per thread: the event loop (the main thread) and the connect
threads (aiomqtt runs paho's blocking connect in threads: TCP connect, TLS handshake,
CONNECT). The event loop's CPU is then split by phase by py-spy's samples of the main
thread, each attributed by the innermost frame that names one: TLS record I/O, MQTT
packet handling, store and key writes, the simulated backend (command syncs), executor
hops, the agent's rules and the event loop itself. The main thread is busy for most of
a start, so its samples follow its CPU; a sample taken while it waited for the GIL
counts too, so the shares are approximate and the total is the measured one.

``--memory`` runs the same start without py-spy and prints the memory per device after
building and after the start: resident (from /proc) and Python objects (tracemalloc);
the difference is C memory (OpenSSL, SQLite) and the allocator's own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.core.purposes import Purpose
from bench import cpu_seconds, positive_int
from bench.fleet import _built, _fleet, _until
from simulator.broker import MosquittoBroker
from simulator.pki import DevPki
from simulator.sampling import rss_kib

RATE_HZ: Final = 250
# Innermost match wins; the patterns are substrings of py-spy's "function (file:line)".
PHASES: Final = (
    ("TLS context and key loading", ("load_cert_chain", "load_verify_locations", "client_context")),
    ("TLS handshake", ("handshake",)),
    ("TLS record I/O", ("sslproto.py", "ssl.py")),
    ("TCP connect", ("create_connection", "sock_connect", "_connect_sock")),
    ("store and key writes", ("agent/store/", "sqlite3", "write_private", "fsync")),
    ("simulated backend (command syncs)", ("simulator/cloud.py", "simulator/acks.py")),
    ("MQTT subscribe", ("subscribe",)),
    ("MQTT publish and acknowledgement", ("publish", "_handle_pub", "puback", "on_publish")),
    ("MQTT connect", ("connect (paho", "_send_connect", "reconnect", "__aenter__")),
    ("MQTT packet handling", ("paho/mqtt", "aiomqtt")),
    ("agent rules and transport", ("agent/",)),
    ("executor hops", ("concurrent/futures", "run_in_executor", "threading.py")),
    ("event loop", ("asyncio/",)),
)


def phase_of(stack: str) -> str:
    """The phase of one collapsed stack (outermost frame first, ';'-separated)."""
    for frame in reversed(stack.split(";")):
        for name, patterns in PHASES:
            if any(p in frame for p in patterns):
                return name
    return "other"


def attribute(collapsed: str) -> Counter[str]:
    """Samples per phase of the main thread's event loop during the start, from py-spy's
    raw output with ``--threads`` (each stack starts with its thread). The profiler's own
    set-up, polling and stop run inside ``_start`` and are left out."""
    out: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not (stack and count.isdigit()) or "MainThread" not in stack.split(";", 1)[0]:
            continue
        if "Handle._run" in stack and "_start (bench/profile.py" not in stack:
            out[phase_of(stack)] += int(count)
    return out


def thread_cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process's main thread and of all its others."""
    main = others = 0.0
    for tid in os.listdir("/proc/self/task"):
        try:
            cpu = cpu_seconds(Path(f"/proc/self/task/{tid}/stat"))
        except FileNotFoundError:
            continue  # a thread that just ended
        if int(tid) == os.getpid():
            main += cpu
        else:
            others += cpu
    return main, others


async def _start(
    n: int,
    host: str,
    port: int,
    pki_dir: Path,
    workdir: Path,
    *,
    probe: Callable[[str], None] = lambda _stage: None,
) -> float:
    class _Broker:  # what _fleet needs of a broker
        def __init__(self) -> None:
            self.host, self.port = host, port

        def restart(self) -> None:
            raise RuntimeError("no restarts while profiling")

    fleet = _fleet(n, _Broker(), DevPki(pki_dir), workdir)  # type: ignore[arg-type]
    probe("empty")
    devs = await _built(fleet, Purpose.ACTIVATION)
    probe("built")
    async with fleet.cloud.connected():
        t0 = time.monotonic()
        fleet.start()
        await _until(lambda: all(len(d.truth.acked) >= 1 for d in devs), 900)
        took = time.monotonic() - t0
        probe("connected")
        await fleet.stop()
    assert fleet.store is not None  # noqa: S101
    fleet.store.db.close()
    return took


def memory(n: int) -> int:
    """Where a fleet's memory goes: resident and Python-allocated KiB per device, after
    building (stores, keys, TLS contexts) and after the start (connections, tasks)."""
    rss: dict[str, int] = {}
    snaps: dict[str, tracemalloc.Snapshot] = {}

    def probe(stage: str) -> None:
        gc.collect()
        rss[stage] = rss_kib()
        snaps[stage] = tracemalloc.take_snapshot()

    tracemalloc.start()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pki = DevPki(root / "pki").ensure()
        with MosquittoBroker(pki) as broker:
            start = _start(n, broker.host, broker.port, pki.root, root / "f", probe=probe)
            took = asyncio.run(start)
    print(f"{n} agents up, each activation acknowledged, in {took:.1f} s")
    print(f"{'stage':<11} {'resident KiB/dev':>17} {'Python objects':>15}   largest Python sources")
    for before, after in (("empty", "built"), ("built", "connected")):
        diff = snaps[after].compare_to(snaps[before], "filename")
        python = sum(st.size_diff for st in diff) / 1024 / n
        top = ", ".join(
            f"{Path(st.traceback[0].filename).name} {st.size_diff / 1024 / n:.1f}"
            for st in diff[:4]
        )
        print(f"{after:<11} {(rss[after] - rss[before]) / n:>17.1f} {python:>15.1f}   {top}")
    return 0


def main() -> int:
    """Profile a fleet start and print CPU microseconds per device by phase."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--devices", type=positive_int, default=2000)
    parser.add_argument("--out", default="bench/results/profile-start.txt", help="py-spy output")
    parser.add_argument(
        "--memory", action="store_true", help="memory per device by stage instead of CPU"
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("HOST", "PORT", "PKI", "WORKDIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory:
        return memory(args.devices)
    if args.child:
        host, port, pki_dir, workdir = args.child
        cpu: dict[str, tuple[float, float]] = {}

        def probe(stage: str) -> None:
            cpu[stage] = thread_cpu()

        start = _start(args.devices, host, int(port), Path(pki_dir), Path(workdir), probe=probe)
        took = asyncio.run(start)
        (main0, others0), (main1, others1) = cpu["built"], cpu["connected"]
        print(f"{args.devices} agents up, each activation acknowledged, in {took:.1f} s")
        print(f"cpu_s {main1 - main0:.3f} {others1 - others0:.3f} {took:.3f}")
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).is_file():
        # Not a dependency: its wheels do not cover every board the agent runs on.
        print(
            "py-spy is not installed: .venv/bin/pip install py-spy (or use --memory, "
            "which needs nothing more)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pki = DevPki(root / "pki").ensure()
        with MosquittoBroker(pki) as broker:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [
                spy, "record", "--threads", "--format", "raw", "--rate", str(RATE_HZ),
                "--output", str(out),
                "--", sys.executable, "-m", "bench.profile", "--devices", str(args.devices),
                "--child", broker.host, str(broker.port), str(pki.root), str(root / "fleet"),
            ]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr.strip()[-2000:], file=sys.stderr)
                return 1
    lines = done.stdout.splitlines()
    print("\n".join(x for x in lines if not x.startswith(("cpu_s", "py-spy"))))
    loop_s, threads_s, took = (
        float(v) for v in next(x for x in lines if x.startswith("cpu_s")).split()[1:]
    )
    samples = attribute(out.read_text())
    total = sum(samples.values()) or 1
    n = args.devices
    loop_us, threads_us = loop_s * 1e6 / n, threads_s * 1e6 / n
    print(
        f"CPU during the start: {loop_s + threads_s:.1f} s in {took:.1f} s, "
        f"{loop_us + threads_us:.0f} us per device"
    )
    print(f"{'where':<46} {'CPU us/device':>14} {'share':>7}")
    print(f"{'connect threads (TCP, TLS handshake, CONNECT)':<46} {threads_us:>14.0f}")
    print(f"{'event loop (main thread), of which:':<46} {loop_us:>14.0f}")
    for name, count in samples.most_common():
        print(f"{'  ' + name:<46} {count / total * loop_us:>14.0f} {count / total:>7.1%}")
    print(f"({total} py-spy samples of the event loop at {RATE_HZ} Hz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
