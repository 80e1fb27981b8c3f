"""A broker the simulator did not start (``--broker``): its address, the backend's
identity on it, and where a NATS cluster's JetStream is (``--jetstream``)."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from agent.config import mqtts_host_port
from agent.errors import ConfigError
from agent.runtime.tls import client_context
from simulator.jetstream import JetStreamAt


@dataclass(frozen=True)
class ExternalBroker:
    """A broker the simulator did not start, and the backend's identity on it."""

    url: str
    ca: Path | None
    cert: Path | None
    key: Path | None
    protocol: Literal["v5", "v311"] = "v5"
    # Other nodes of a clustered broker on the same host (--fallback).
    fallbacks: tuple[str, ...] = ()
    # A NATS cluster's NATS ports (--jetstream): the backend reads the uplink there.
    jetstream: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for url in self.jetstream:  # wrong at once, before any identity is read
            try:
                parts = urlsplit(url)
                ok = parts.scheme == "tls" and bool(parts.hostname) and parts.port is not None
            except ValueError:  # a bad port or IPv6 address
                ok = False
            if not ok:
                raise ConfigError(f"--jetstream {url}: give a node's NATS port as tls://HOST:PORT")

    def jetstream_at(self) -> JetStreamAt | None:
        """Where the backend reads the uplink, if not over MQTT."""
        return JetStreamAt(self.jetstream) if self.jetstream else None

    def address(self) -> tuple[str, int, ssl.SSLContext]:
        """Host, port and the backend's TLS context; ConfigError on a bad URL or identity."""
        if not (self.ca and self.cert and self.key):
            raise ConfigError("--broker needs --ca, --cert and --key (the backend's identity)")
        host, port = _host_port("--broker", self.url)
        tls = client_context(self.ca, self.cert, self.key)
        _listening("--broker", host, port)
        return host, port, tls

    def ports(self) -> list[int]:
        """The broker's port, then each fallback's (all on the broker's host)."""
        host, port = _host_port("--broker", self.url)
        ports = [port]
        for url in self.fallbacks:
            other, p = _host_port("--fallback", url)
            if other != host:
                raise ConfigError(f"--fallback {url}: must be on the broker's host {host}")
            ports.append(p)
        return ports


PROBE_S: Final = 5.0  # how long --broker's address may take to accept a TCP connection


def _listening(option: str, host: str, port: int) -> None:
    """ConfigError at once, naming the address and the fix, unless something accepts a
    TCP connection there (the backend would otherwise retry for 30 s)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_S):
            return
    except ConnectionRefusedError:
        why = "nothing listens there (connection refused)"
    except TimeoutError:
        why = f"no answer within {PROBE_S:g} s (a firewall, or the wrong host)"
    except OSError as exc:
        why = exc.strerror or str(exc)
    raise ConfigError(
        f"{option}: cannot reach {host}:{port}: {why}. Start a broker there (for a local "
        "one: smartmi-sim broker up) or give the address it listens on"
    )


def _host_port(option: str, url: str) -> tuple[str, int]:
    try:
        return mqtts_host_port(url)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None
