"""Prometheus metrics of one agent or of a whole simulated fleet (prometheus-client).

The figures are read from the same status the CLI shows, at scrape time: there is no
second set of counters to drift from the first. They are counts and states only,
never a value a user gave. The daemon serves them over HTTP on a loopback address or
a Unix socket (``[metrics] listen``; off by default); the fleet writes them to a file
in the text format.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from agent.config import listen_address
from agent.core.purposes import Purpose
from agent.runtime.control import private_unix_server

log = logging.getLogger("smartmi.metrics")

MAX_REQUEST_HEAD: Final = 8192
READ_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one agent's status says: the device's, its transport's, its crash files'."""

    device: dict[str, Any]
    transport: dict[str, Any] = field(default_factory=dict)
    crash_files: dict[str, int] = field(default_factory=dict)


_GAUGES: Final = (
    # name, help, where, key; summed over the agents
    ("queued_items", "Items waiting in the outbox.", "device", "queued"),
    ("in_flight_items", "Items handed to the broker, not yet acknowledged.", "device", "in_flight"),
    (
        "deletion_requests_pending",
        "Deletion requests not yet acknowledged by the cloud.",
        "device",
        "deletion_requests_pending",
    ),
    ("quarantined_records", "Stored records that failed their check.", "device", "quarantined"),
)
_COUNTERS: Final = (
    ("connects", "Connections established.", "connects"),
    ("published", "Items published.", "published"),
    ("acknowledged", "Items the broker acknowledged.", "acknowledged"),
    ("refused", "Items the broker refused (they stay queued).", "refused"),
    ("commands_applied", "Cloud commands applied.", "commands_applied"),
    ("commands_ignored", "Cloud commands ignored (stale or replayed).", "commands_ignored"),
    ("commands_rejected", "Cloud commands rejected as malformed.", "commands_rejected"),
)


class AgentCollector(Collector):
    """The metric families of every agent ``snapshots()`` returns, summed."""

    def __init__(self, snapshots: Callable[[], Iterable[Snapshot]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus-client at each scrape or file write."""
        snaps = list(self.snapshots())
        yield _gauge("agents", "Agents these figures cover.", len(snaps))
        yield _gauge(
            "connected",
            "Agents connected to the broker.",
            sum(bool(s.transport.get("connected")) for s in snaps),
        )
        yield _gauge(
            "commands_synced",
            "Agents that applied every command issued before their connection.",
            sum(bool(s.transport.get("commands_synced")) for s in snaps),
        )
        yield _gauge(
            "storage_ok",
            "Agents whose store took every write (0 while anything is not durable).",
            sum(bool((s.device.get("storage") or {}).get("ok", True)) for s in snaps),
        )
        for name, text, where, key in _GAUGES:
            yield _gauge(name, text, sum(_number(getattr(s, where), key) for s in snaps))
        consent = GaugeMetricFamily(
            "smartmi_agent_consent_in_force",
            "Agents on which the purpose's consent is in force.",
            labels=["purpose"],
        )
        for purpose in Purpose:
            consent.add_metric(
                [purpose.value],
                sum((s.device.get("consent") or {}).get(purpose.value) == "ok" for s in snaps),
            )
        yield consent
        for name, text, key in _COUNTERS:
            yield CounterMetricFamily(
                f"smartmi_agent_{name}", text, sum(_number(s.transport, key) for s in snaps)
            )
        crashes = CounterMetricFamily(
            "smartmi_agent_crash_files",
            "Crash files handled, by outcome.",
            labels=["outcome"],
        )
        for outcome in ("captured", "discarded_without_consent", "invalid"):
            crashes.add_metric([outcome], sum(_number(s.crash_files, outcome) for s in snaps))
        yield crashes
        dropped = CounterMetricFamily(
            "smartmi_agent_dropped", "Items dropped before sending, by reason.", labels=["reason"]
        )
        reasons = sorted({r for s in snaps for r in (s.device.get("dropped") or {})})
        for reason in reasons:
            dropped.add_metric(
                [reason], sum(_number(s.device.get("dropped") or {}, reason) for s in snaps)
            )
        yield dropped


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"smartmi_agent_{name}", text, value=value)


def _number(source: dict[str, Any], key: str) -> float:
    value = source.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def registry_of(snapshots: Callable[[], Iterable[Snapshot]]) -> CollectorRegistry:
    """A registry holding only the agents' metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(snapshots))
    return registry


def write_file(path: Path, snapshots: Iterable[Snapshot]) -> None:
    """The metrics in the Prometheus text format, written atomically (for a textfile
    collector, or for a fleet run's results)."""
    frozen = list(snapshots)
    write_to_textfile(str(path), registry_of(lambda: frozen))


async def serve(listen: str, registry: CollectorRegistry) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``listen``: ``HOST:PORT`` (loopback, checked by the
    configuration) or ``unix:PATH`` (a 0600 socket)."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, kind = _answer(head, registry)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("metrics client went away", extra={"error": type(exc).__name__})
        except asyncio.LimitOverrunError:
            writer.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n"
            )
        finally:
            writer.close()

    where = listen_address(listen)
    if isinstance(where, Path):
        return await private_unix_server(where, client, limit=MAX_REQUEST_HEAD)
    host, port = where
    return await asyncio.start_server(client, host, port, limit=MAX_REQUEST_HEAD)


def _answer(head: bytes, registry: CollectorRegistry) -> tuple[str, bytes, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    text = "text/plain; charset=utf-8"
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "400 Bad Request", b"bad request\n", text
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", b"GET /metrics only\n", text
    if target not in ("/metrics", "/"):
        return "404 Not Found", b"GET /metrics\n", text
    body = generate_latest(registry)
    return "200 OK", b"" if method == "HEAD" else body, CONTENT_TYPE_LATEST


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_files(sources: Iterable[Path], dest: Path) -> None:
    """Sum the metrics of several text files (the shards of one fleet) into ``dest``:
    each sample adds up over the files with the same name and labels."""
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for path in sources:
        for family in text_string_to_metric_families(path.read_text(encoding="utf-8")):
            merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            into = sums.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                into[key] = into.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in sums[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(merged.values())))
    write_to_textfile(str(dest), registry)
