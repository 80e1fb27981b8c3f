"""Prometheus metrics: the daemon serves its own on loopback or a Unix socket, off by
default; the figures follow what the agent did."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.runtime import metrics
from simulator.broker import MosquittoBroker
from simulator.cloud import Cloud
from simulator.pki import DevPki
from simulator.rig import until
from tests.e2e.test_daemon import DEVICE, agent, log_line, spawn, write_config
from tests.prometheus import samples

pytestmark = pytest.mark.asyncio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(
    target: str, *, unix: Path | None = None, port: int = 0, method: str = "GET"
) -> tuple[int, str]:
    if unix is not None:
        reader, writer = await asyncio.open_unix_connection(str(unix))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_the_daemon_serves_its_figures_on_loopback(
    tmp_path: Path,
    broker: MosquittoBroker,
    pki: DevPki,
    cloud: Cloud,
    capsys: pytest.CaptureFixture[str],
) -> None:
    conf = write_config(tmp_path, broker, pki)
    port = free_port()
    conf.write_text(conf.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    proc = await spawn(conf)
    try:
        await log_line(proc, "metrics served")
        await log_line(proc, "connected")
        agent(conf, capsys, "bind", "--binding-id", "owner-m")
        agent(conf, capsys, "consent", "grant", "diagnostics")
        for _ in range(3):
            agent(conf, capsys, "crash", "--simulate")
        await until(cloud, lambda: len(cloud.of(DEVICE, "crash")) >= 3)

        async def scraped() -> dict[str, float]:
            code, body = await http_get("/metrics", port=port)
            assert code == 200
            return samples(body)

        async with asyncio.timeout(20):
            while (m := await scraped())["smartmi_agent_acknowledged_total"] < 3:  # noqa: ASYNC110  # polling another process
                await asyncio.sleep(0.2)
        assert m["smartmi_agent_agents"] == 1
        assert m["smartmi_agent_connected"] == 1
        assert m['smartmi_agent_consent_in_force{purpose="diagnostics"}'] == 1
        assert m['smartmi_agent_consent_in_force{purpose="activation"}'] == 0
        assert m["smartmi_agent_queued_items"] == 0
        agent(conf, capsys, "consent", "withdraw", "diagnostics")
        m = await scraped()
        assert m['smartmi_agent_consent_in_force{purpose="diagnostics"}'] == 0
        assert (await http_get("/other", port=port))[0] == 404
        assert (await http_get("/metrics", port=port, method="POST"))[0] == 405
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()


async def test_a_unix_socket_endpoint_is_the_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.sock"
    snap = metrics.Snapshot(
        {"queued": 4, "consent": {"activation": "ok", "diagnostics": "withdrawn"}},
        {"connected": True, "acknowledged": 7},
    )
    server = await metrics.serve(f"unix:{path}", metrics.registry_of(lambda: [snap, snap]))
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        code, body = await http_get("/metrics", unix=path)
        assert code == 200
        figures = samples(body)
        assert figures["smartmi_agent_agents"] == 2
        assert figures["smartmi_agent_queued_items"] == 8
        assert figures["smartmi_agent_acknowledged_total"] == 14
        assert figures['smartmi_agent_consent_in_force{purpose="activation"}'] == 2
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 10_000 + b"\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 431")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:9108", "loopback address"),
        ("192.0.2.7:9108", "loopback address"),
        ("127.0.0.1:99999", "port from 1 to 65535"),
        ("9108", "is not HOST:PORT"),
        ("unix:", "needs a socket path"),
    ],
)
async def test_metrics_beyond_the_machine_are_refused(
    tmp_path: Path, listen: str, message: str
) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(
        '[device]\nid = "m-1"\nserial = "S"\nmodel = "M"\nfirmware_version = "1"\n'
        '[privacy]\npolicy_version = "1"\n[paths]\nstate_dir = "s"\n'
        f'[metrics]\nlisten = "{listen}"\n'
    )
    with pytest.raises(ConfigError, match=message) as info:
        load_config(conf)
    assert "metrics.listen" in str(info.value)


async def test_metrics_are_off_by_default(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    conf = write_config(tmp_path, broker, pki)
    assert load_config(conf).metrics is None
    relative = tmp_path / "rel.toml"
    relative.write_text(conf.read_text() + '\n[metrics]\nlisten = "unix:run/m.sock"\n')
    assert load_config(relative).metrics.listen == f"unix:{tmp_path / 'run' / 'm.sock'}"  # type: ignore[union-attr]
