"""A broker killed with -9 under load: how many items it acknowledged never reach the backend.

``python -m bench.kill9 [--kills 20] [--only NAME]`` runs the loop against:

- Mosquitto with broker-config as it ships (a save every 30 s);
- Mosquitto saving after every change (``autosave_on_changes true``, ``autosave_interval 1``);
- one NATS node (JetStream on disk);
- a 3-node NATS cluster, killing one node at a time (a random one) and starting it again.

For each it prints the items captured, acknowledged by the broker, received by the
backend, lost (not received 60 s after the agents had sent everything), how many of
them had not arrived yet when the agents were done, and the latency from capture to
the backend.

The agent counts an item as delivered only on a PUBACK without a failure reason; a
v5 PUBACK 0x10 (no matching subscribers, as while the backend reconnects after a
restart) leaves it queued. What remains is Mosquitto's: an item it acknowledged and
still held for the backend when it was killed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.core.purposes import Purpose, parse_rfc3339
from bench import positive_int
from simulator.broker import LocalBroker, MosquittoBroker, repo_broker_config
from simulator.cloud import Cloud
from simulator.nats import NatsCluster
from simulator.pki import DevPki
from simulator.rig import Agent, crash

AGENTS = 4
CATCH_UP_S: list[float] = []  # how long each killed cluster node took to catch up


async def loop(broker: LocalBroker, root: Path, kills: int, pki: DevPki) -> dict[str, float]:
    """One kill -9 loop against a started ``broker``; the counts."""
    rng = random.Random(20)
    agents = [
        Agent(root=root / f"a{n}", device_id=f"kill9-{n}", broker=broker, pki=pki, node=n)
        for n in range(AGENTS)
    ]
    captured = late = 0
    acknowledged: set[str] = set()
    cloud = Cloud.on(broker, pki)
    async with cloud.connected():
        cores = [a.open() for a in agents]
        for a, core in zip(agents, cores, strict=True):
            core.bind(f"owner-{a.device_id}", now=time.time())
            core.grant(Purpose.DIAGNOSTICS, now=time.time())
            a.start()

        async def capture_for(seconds: float) -> None:
            nonlocal captured
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for core in cores:
                    core.capture_crash(crash(captured), now=time.time())
                    captured += 1
                await asyncio.sleep(0.02)

        try:
            for _ in range(kills):
                await capture_for(rng.uniform(0.3, 0.8))
                await asyncio.to_thread(kill_one, broker, rng)
            await capture_for(0.5)
            async with asyncio.timeout(180):
                while any(core.queued_count() for core in cores):  # noqa: ASYNC110  # a poll
                    await asyncio.sleep(0.2)
            for core in cores:
                acknowledged |= {
                    e["msg_id"]
                    for e in core.export(now=time.time())["entries"]
                    if e["type"] == "sent" and e["confirmed"]
                }
            # What a broker holds for the backend may come after its redelivery wait.
            late = len(acknowledged - {m.msg_id for m in cloud.received})
            async with asyncio.timeout(60):
                await cloud.wait_for(lambda got: acknowledged <= {m.msg_id for m in got})
        except TimeoutError:
            pass
        finally:
            for a in agents:
                await a.stop()
    received = {m.msg_id for m in cloud.received}
    latencies = sorted(
        m.arrived_at - parse_rfc3339(m.envelope()["captured_at"])
        for m in cloud.received
        if "captured_at" in m.envelope()
    )
    return {
        "captured": captured,
        "acknowledged": len(acknowledged),
        "received": len(received & acknowledged),
        "lost": len(acknowledged - received),
        "late": late,
        "p50": statistics.median(latencies) if latencies else 0.0,
        "p99": latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
    }


def kill_one(broker: LocalBroker, rng: random.Random) -> None:
    """SIGKILL the broker (one random node of a cluster) and start it again."""
    if isinstance(broker, NatsCluster) and len(broker.nodes) > 1:
        node = rng.randrange(len(broker.nodes))
        broker.kill_node(node)
        t0 = time.monotonic()
        broker.start_node(node)
        CATCH_UP_S.append(time.monotonic() - t0)
    else:
        broker.restart(kill=True)


def brokers(pki: DevPki, root: Path) -> dict[str, Callable[[], LocalBroker]]:
    """The brokers to kill, by name, each made when its loop starts."""
    every_change = root / "every-change"
    shutil.copytree(repo_broker_config(), every_change)
    conf = every_change / "mosquitto.conf"
    conf.write_text(
        conf.read_text().replace(
            "autosave_interval 30", "autosave_on_changes true\nautosave_interval 1"
        )
    )
    return {
        "mosquitto (save every 30 s, as shipped)": lambda: MosquittoBroker(pki),
        "mosquitto (save after every change)": lambda: MosquittoBroker(
            pki, config_dir=every_change
        ),
        "nats, 1 node": lambda: NatsCluster(pki, nodes=1),
        "nats, 3 nodes (one killed at a time)": lambda: NatsCluster(pki, nodes=3),
    }


def main() -> int:
    """Run the loops and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.kill9", description=__doc__)
    parser.add_argument("--kills", type=positive_int, default=20)
    parser.add_argument("--only", help="run only the brokers whose name contains this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="smartmi-kill9-") as tmp:
        root = Path(tmp)
        pki = DevPki(root / "pki").ensure()
        for n, (name, make) in enumerate(brokers(pki, root).items()):
            if args.only and args.only not in name:
                continue
            with make().start() as broker:
                counts = asyncio.run(loop(broker, root / f"run{n}", args.kills, pki))
            share = counts["lost"] / max(1, counts["acknowledged"])
            print(
                f"kill -9 x{args.kills}, {name:<38} captured {counts['captured']:>5.0f}  "
                f"acknowledged {counts['acknowledged']:>5.0f}  "
                f"received {counts['received']:>5.0f}  "
                f"lost {counts['lost']:>4.0f} ({share:.1%})  "
                f"not yet arrived when the agents were done {counts['late']:>4.0f}  "
                f"latency p50 {counts['p50']:.3f} s p99 {counts['p99']:.3f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
