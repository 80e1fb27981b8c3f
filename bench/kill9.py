"""Mosquitto killed with -9 under load: how many items it acknowledged never reach the backend.

``python -m bench.kill9 [--kills 20]`` runs the loop twice, with broker-config as it
ships (a save every 30 s) and with a save after every change
(``autosave_on_changes true``, ``autosave_interval 1``), and prints, for each, the
items captured, acknowledged by the broker, received by the backend, and lost.

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
import tempfile
import time
from pathlib import Path

from agent.core.purposes import Purpose
from simulator.broker import MosquittoBroker, repo_broker_config
from simulator.cloud import Cloud
from simulator.pki import DevPki
from tests.e2e.fleet import Agent, crash

AGENTS = 4


async def loop(pki: DevPki, config_dir: Path, root: Path, kills: int) -> dict[str, int]:
    """One kill -9 loop against a broker with ``config_dir``; the counts."""
    rng = random.Random(20)
    broker = MosquittoBroker(pki, config_dir=config_dir).start()
    agents = [
        Agent(root=root / f"a{n}", device_id=f"kill9-{n}", broker=broker, pki=pki)
        for n in range(AGENTS)
    ]
    captured = 0
    try:
        async with Cloud(broker.host, broker.port, pki).connected() as cloud:
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
                    await asyncio.to_thread(broker.restart, kill=True)
                await capture_for(0.5)
                async with asyncio.timeout(120):
                    while any(core.queued_count() for core in cores):  # noqa: ASYNC110  # a poll
                        await asyncio.sleep(0.2)
                    await asyncio.sleep(1.0)
                acknowledged: set[str] = set()
                for core in cores:
                    acknowledged |= {
                        e["msg_id"]
                        for e in core.export(now=time.time())["entries"]
                        if e["type"] == "sent" and e["confirmed"]
                    }
            finally:
                for a in agents:
                    await a.stop()
            received = {m.envelope()["msg_id"] for m in cloud.received}
    finally:
        broker.stop()
        broker.cleanup()
    return {
        "captured": captured,
        "acknowledged": len(acknowledged),
        "received": len(received & acknowledged),
        "lost": len(acknowledged - received),
    }


def main() -> int:
    """Run both loops and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.kill9", description=__doc__)
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="smartmi-kill9-") as tmp:
        root = Path(tmp)
        pki = DevPki(root / "pki")
        every_change = root / "every-change"
        shutil.copytree(repo_broker_config(), every_change)
        conf = every_change / "mosquitto.conf"
        conf.write_text(
            conf.read_text().replace(
                "autosave_interval 30", "autosave_on_changes true\nautosave_interval 1"
            )
        )
        for name, config_dir in (
            ("as shipped (30 s)", repo_broker_config()),
            ("every change", every_change),
        ):
            counts = asyncio.run(loop(pki, config_dir, root / name.split()[0], args.kills))
            share = counts["lost"] / max(1, counts["acknowledged"])
            print(
                f"kill -9 x{args.kills}, save {name:<18} captured {counts['captured']:>5}  "
                f"acknowledged {counts['acknowledged']:>5}  received {counts['received']:>5}  "
                f"lost {counts['lost']:>4} ({share:.1%})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
