"""``smartmi-agent run``: the daemon that systemd starts on a device.

It holds the state directory's lock for its lifetime and runs, in one task group,
the MQTT transport, the crash-directory collector and the control socket. SIGTERM
(systemd's stop) and SIGINT end it cleanly: the transport disconnects, in-flight
items go back to the outbox, and the store is closed; nothing queued is lost.
Logs are JSON lines on stderr (the journal) and never carry payload values or keys.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from agent.config import AgentConfig
from agent.device import RETENTION_SWEEP_S, Device, open_device
from agent.errors import AgentError, ConfigError, StorageError
from agent.runtime import control
from agent.runtime.collectors import CrashDirCollector, install_crash_hooks
from agent.runtime.logs import setup_logging
from agent.runtime.target import BrokerTarget
from agent.runtime.tls import check_identity, client_context
from agent.runtime.transport import Transport

if TYPE_CHECKING:
    from agent.runtime.metrics import Snapshot

log = logging.getLogger("smartmi.daemon")


def process_started_at() -> float:
    """When this process started (wall clock): from /proc on Linux, else module import."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(stat[19]) / os.sysconf("SC_CLK_TCK")  # seconds after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT
    return time.time() - age


_IMPORTED_AT: Final = time.time()
SETTLE_S: Final = 5.0  # how often a store that refused a write is tried again
LOCK_WAIT_S: Final = 5.0  # how long the daemon waits at start for a CLI verb to let go


async def run(config: AgentConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    broker = config.broker
    if broker is None:
        raise ConfigError("the daemon needs a [broker] section", where="agent.toml")
    check_identity(broker.cert, broker.key, config.device.id)
    tls = client_context(broker.ca, broker.cert, broker.key)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A CLI verb acting on the state directory holds it for a moment: wait for it.
    with open_device(config, now=time.time(), wait_s=LOCK_WAIT_S) as device:
        try:
            fatal_log: TextIO | None = install_crash_hooks(config.own_crash_dir, loop)
        except OSError as exc:
            fatal_log = None
            log.error(  # noqa: TRY400  # the errno says it
                "crash hooks not installed: the crash directory is unusable",
                extra={"dir": str(config.own_crash_dir), "error": exc.strerror or str(exc)},
            )
        target = BrokerTarget(
            broker.host,
            broker.port,
            tls,
            protocol=broker.protocol,
            keepalive=broker.keepalive,
            fallbacks=broker.endpoints[1:],
        )
        transport = Transport(device, target)
        collector = CrashDirCollector(device, *config.crash_dirs, started=time.time())

        def handle(request: dict[str, Any]) -> dict[str, Any]:
            result = control.act(device, request, now=time.time())
            if request.get("verb") == "status":
                result["transport"] = transport.status()
                connected = transport.stats.first_connected_at
                result["transport"]["start_to_connected_s"] = (
                    None if connected is None else round(connected - started_wall, 3)
                )
                result["crash_files"] = collector.counts()
            return result

        started_wall = process_started_at()
        server = await control.serve(config.socket_path, handle)
        scrape = await _serve_metrics(config, device, transport, collector)
        log.info("started", extra={"device": device.device_id, "broker": broker.url})
        try:
            async with asyncio.TaskGroup() as tg:
                link = tg.create_task(transport.run(), name="transport")
                crashes = tg.create_task(collector.run(), name="crash-collector")
                sweeper = tg.create_task(retention(device), name="retention")
                settling = tg.create_task(settler(device), name="settle")
                await stop.wait()
                log.info("stopping", extra={"device": device.device_id})
                transport.stop(link)
                crashes.cancel()
                sweeper.cancel()
                settling.cancel()
        finally:
            await _close(server, scrape)
            config.socket_path.unlink(missing_ok=True)
            if fatal_log is not None:
                fatal_log.close()
        log.info(
            "stopped",
            extra={"device": device.device_id, "queued": device.queued_count()},
        )


async def _close(*servers: asyncio.Server | None) -> None:
    for server in servers:
        if server is not None:
            server.close()
            await server.wait_closed()


async def _serve_metrics(
    config: AgentConfig, device: Device, transport: Transport, collector: CrashDirCollector
) -> asyncio.Server | None:
    """The Prometheus endpoint of ``[metrics]``, or None when it is off or cannot start
    (logged: metrics are never a reason for the agent not to run)."""
    if config.metrics is None:
        return None
    from agent.runtime import metrics  # 2 MB of prometheus-client, only when asked for

    listen = config.metrics.listen

    def snapshot() -> list[Snapshot]:
        return [
            metrics.Snapshot(
                device.status(),
                transport.status(),
                collector.counts(),
            )
        ]

    try:
        server = await metrics.serve(listen, metrics.registry_of(snapshot))
    except OSError as exc:
        log.error("metrics not served", extra={"listen": listen, "error": exc.strerror or str(exc)})  # noqa: TRY400
        return None
    log.info("metrics served", extra={"listen": listen})
    return server


async def retention(device: Device, interval: float = RETENTION_SWEEP_S) -> None:
    """Delete what is past its retention every ``interval`` seconds, connected or not (P7).

    A sweep that the store refuses is logged and tried again; an expired item is never
    sent either way (``Device.next_batch`` checks each one).
    """
    while True:
        try:
            swept = device.sweep_retention(now=time.time())
        except StorageError as exc:
            log.error("retention sweep failed", extra={"kind": exc.kind, "error": str(exc)})  # noqa: TRY400
        else:
            if swept:
                log.info("retention swept", extra={"device": device.device_id, "expired": swept})
        await asyncio.sleep(interval)


async def settler(device: Device, interval: float = SETTLE_S) -> None:
    """While the store refuses writes, try every ``interval`` seconds to make durable what
    is in force only in memory (``Device.settle``); sending resumes when it succeeds."""
    while True:
        await asyncio.sleep(interval)
        if not device.needs_settling:
            continue
        if device.settle(now=time.time()):
            log.info("storage usable again", extra={"device": device.device_id})


def main(config: AgentConfig, *, level: int = logging.INFO, log_format: str = "json") -> int:
    """Entry point of ``smartmi-agent run``: exit status 0 after a clean stop."""
    setup_logging(level, log_format)
    try:
        asyncio.run(run(config))
    except AgentError as exc:
        log.error("cannot run", extra={"error": str(exc)})  # noqa: TRY400  # no traceback for a user error
        print(f"smartmi-agent: error: {exc}", file=sys.stderr)
        return 1
    return 0
