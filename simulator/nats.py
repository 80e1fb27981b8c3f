"""Start, kill and restart a local NATS cluster with MQTT enabled (SPEC §5).

``smartmi-sim broker up --cluster N``, the fleet (``smartmi-sim run --cluster N``),
the cluster tests and the kill -9 benchmark use it. Each node is Debian's
``nats-server`` rendered from ``broker-config/nats-server.conf`` into a runtime
directory of its own, with:

- MQTT 3.1.1 over mutual TLS; the user is the client certificate's subject
  (``verify_and_map``), so there are no passwords;
- JetStream for sessions and QoS 1 messages, replicated on ``min(N, 3)`` nodes;
- ``users.conf``: broker-config's ACL written out user by user, and the lines that
  differ by server version (``simulator/nats_config.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import string
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Self

from agent.errors import BrokerError
from simulator.broker import (
    end_process,
    listen_port,
    memory_kib,
    repo_broker_config,
    require_free,
)
from simulator.guard import Guard
from simulator.jetstream import JetStreamAt, replicas_for
from simulator.nats_config import (
    find_nats_server,
    nats_device_id,
    server_version,
    users_conf,
    version_fields,
)
from simulator.pki import DevPki
from simulator.probe import serves_mqtt

_START_TIMEOUT: Final = 30.0
# A node started again catches up on what the others wrote meanwhile.
_CATCH_UP_TIMEOUT: Final = 120.0
CLUSTER_NAME: Final = "smartmi"
# NATS's JetStream streams for MQTT sessions and QoS 1 messages.
_MQTT_STREAMS: Final = ("$MQTT_sess", "$MQTT_msgs")


@dataclass
class _Node:
    index: int
    name: str
    port: int  # MQTT over TLS
    client_port: int
    http_port: int
    route_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    log: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """N local nats-server processes on loopback, clustered, serving MQTT over mutual TLS."""

    protocol: Literal["v5", "v311"] = "v311"  # NATS speaks MQTT 3.1.1 only
    # The backend keeps its session across reconnects: JetStream holds what arrives
    # for it meanwhile (Mosquitto's backend runs clean, see simulator/cloud.py).
    backend_persistent = True

    def __init__(
        self,
        pki: DevPki,
        *,
        nodes: int = 3,
        bind: str = "127.0.0.1",
        devices: Iterable[str] = (),
        config_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:  # TCP's range
            raise BrokerError(f"--port {port}: a TCP port is 1 to 65535")
        if nodes < 1 or nodes == 2:  # two nodes cannot lose one
            raise BrokerError(
                f"--cluster {nodes}: use 1, or 3 or more nodes (JetStream needs a majority "
                "of its nodes; two cannot lose one)"
            )
        self.pki = pki.ensure()
        self.bind = bind
        self.binary = find_nats_server()
        self.version = server_version(self.binary)
        self.config_dir = config_dir or repo_broker_config()
        self.template = self.config_dir / "nats-server.conf"
        if not self.template.is_file():
            raise BrokerError(f"NATS configuration not found at {self.template}")
        self.devices: set[str] = set()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="smartmi-nats-"))
        # Whatever kills us (SIGKILL too), the nodes and this directory go with us.
        self._guard = Guard(self.runtime_dir)
        self.nodes = [
            _Node(
                index=i,
                name=f"smartmi-{i + 1}",
                port=port if (port and i == 0) else listen_port(bind),
                client_port=listen_port(bind),
                http_port=listen_port(bind),
                route_port=listen_port(bind),
                directory=self.runtime_dir / f"node{i + 1}",
            )
            for i in range(nodes)
        ]
        self.replicas = replicas_for(nodes)
        self._next_failure = 0
        self.authorize(devices, reload=False)
        self._render()

    # -- addresses ---------------------------------------------------------------------
    @property
    def host(self) -> str:
        """The address clients connect to."""
        return self.bind

    @property
    def port(self) -> int:
        """The first node's MQTT port."""
        return self.nodes[0].port

    @property
    def ports(self) -> list[int]:
        """Every node's MQTT port, in node order."""
        return [n.port for n in self.nodes]

    def peak_rss_kib(self) -> int:
        """The running nodes' peak resident memory so far, summed (KiB). A node started
        again counts from its restart."""
        return sum(memory_kib(n.proc.pid, "VmHWM") for n in self.nodes if n.running and n.proc)

    @property
    def url(self) -> str:
        """An ``mqtts://`` URL of the first node."""
        return f"mqtts://{self.bind}:{self.port}"

    @property
    def urls(self) -> list[str]:
        """Every node's ``mqtts://`` URL."""
        return [f"mqtts://{self.bind}:{n.port}" for n in self.nodes]

    @property
    def jetstream_urls(self) -> list[str]:
        """Every node's NATS port (mutual TLS), where the backend reads the uplink."""
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return [f"tls://{host}:{n.client_port}" for n in self.nodes]

    @property
    def jetstream(self) -> JetStreamAt:
        """Where the backend reads the uplink: JetStream on every node."""
        return JetStreamAt(tuple(self.jetstream_urls))

    @property
    def log_path(self) -> Path:
        """The first node's log."""
        return self.nodes[0].directory / "nats-server.log"

    @property
    def running(self) -> bool:
        """Whether every node is alive."""
        return all(n.running for n in self.nodes)

    # -- configuration -----------------------------------------------------------------
    def authorize(self, device_ids: Iterable[str], *, reload: bool = True) -> None:
        """Let ``device_ids`` connect (their ACL entries); running nodes reload."""
        new = set(device_ids) - self.devices
        if not new and (self.runtime_dir / "users.conf").exists():
            return
        for device_id in new:
            nats_device_id(device_id)
        self.devices |= new
        text = users_conf(self.devices)
        tmp = self.runtime_dir / "users.conf.tmp"
        tmp.write_text(text)
        tmp.replace(self.runtime_dir / "users.conf")
        reloading = []
        for node in self.nodes:
            if node.directory.exists():
                shutil.copyfile(self.runtime_dir / "users.conf", node.directory / "users.conf")
            if reload and node.running:
                assert node.proc is not None  # noqa: S101  # running
                reloading.append((node, self._get(node, "/varz").get("config_load_time")))
                node.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + _START_TIMEOUT
        for node, before in reloading:  # new users count only once the node reloaded
            while self._get(node, "/varz").get("config_load_time") in (before, None):
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"NATS node {node.name} did not reload its users within "
                        f"{_START_TIMEOUT:.0f} s; its log:\n{self.log_tail(index=node.index)}"
                    )
                time.sleep(0.05)

    def _render(self) -> None:
        template = string.Template(self.template.read_text())
        for node in self.nodes:
            d = node.directory
            (d / "js").mkdir(parents=True)
            shutil.copyfile(self.pki.ca_cert, d / "ca.pem")
            shutil.copyfile(self.pki.broker.cert, d / "broker.pem")
            shutil.copyfile(self.pki.broker.key, d / "broker.key")
            os.chmod(d / "broker.key", 0o600)
            shutil.copyfile(self.runtime_dir / "users.conf", d / "users.conf")
            try:
                text = template.substitute(
                    name=node.name,
                    bind=self.bind,
                    port=node.port,
                    client_port=node.client_port,
                    http_port=node.http_port,
                    store_dir=d / "js",
                    cluster=self._cluster_block(node),
                    cafile=d / "ca.pem",
                    certfile=d / "broker.pem",
                    keyfile=d / "broker.key",
                    replicas=self.replicas,
                    **version_fields(self.version),
                )
            except (KeyError, ValueError) as exc:
                raise BrokerError(f"bad field in {self.template}: {exc}") from exc
            (d / "nats-server.conf").write_text(text)

    def _cluster_block(self, node: _Node) -> str:
        if len(self.nodes) == 1:
            return "# a single node: no cluster"
        routes = ", ".join(
            f'"nats-route://{self.bind}:{n.route_port}"' for n in self.nodes if n is not node
        )
        return (
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: {self.bind}:{node.route_port}\n"
            f"  routes: [{routes}]\n}}"
        )

    # -- processes ---------------------------------------------------------------------
    def start(self) -> Self:
        """Start every node that is not running and wait until each serves MQTT."""
        for node in self.nodes:
            self._spawn(node)
        self._wait_healthy(self.nodes)
        return self

    def start_node(self, index: int) -> None:
        """Start one node again (after :meth:`kill_node`) and wait until the MQTT
        streams have caught up on it, so that another node may go.

        Not until it serves MQTT again: NATS 2.9 has been seen to refuse MQTT
        connections on a restarted node for minutes (its retained-message stream
        lookup times out). Devices fall back to the other nodes meanwhile.
        """
        node = self.nodes[index]
        self._spawn(node)
        self._wait_healthy([node], within=_CATCH_UP_TIMEOUT, mqtt_too=False)

    def _spawn(self, node: _Node) -> None:
        if node.running:
            return
        require_free(self.bind, node.port)
        node.log = os.open(
            node.directory / "nats-server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        node.proc = subprocess.Popen(
            [self.binary, "-c", str(node.directory / "nats-server.conf")],
            stdin=subprocess.DEVNULL,
            stdout=node.log,
            stderr=node.log,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the nodes
        )
        self._guard.watch(node.proc.pid)  # its own session: the group is its pid

    def _wait_healthy(
        self, nodes: list[_Node], within: float = _START_TIMEOUT, *, mqtt_too: bool = True
    ) -> None:
        deadline = time.monotonic() + within
        waiting = list(nodes)
        while waiting and time.monotonic() < deadline:
            for node in list(waiting):
                if node.proc is not None and node.proc.poll() is not None:
                    raise BrokerError(
                        f"nats-server {node.name} exited with code {node.proc.returncode} "
                        f"at start; its log:\n{self.log_tail(index=node.index)}"
                    )
                if self._healthy(node):
                    waiting.remove(node)
            time.sleep(0.05)  # no readiness event to await: poll /healthz
        for node in nodes if mqtt_too else ():
            if node not in waiting and not serves_mqtt(
                self.pki, self.bind, node.port, self.protocol, deadline, name=f"{node.index + 1}"
            ):
                waiting.append(node)
        if waiting:
            names = ", ".join(n.name for n in waiting)
            raise BrokerError(
                f"NATS node(s) {names} not healthy within {within:.0f} s; "
                f"log of {waiting[0].name}:\n{self.log_tail(index=waiting[0].index)}"
            )

    def _healthy(self, node: _Node) -> bool:
        """The node is up with JetStream, knows JetStream's leader (before that, the
        first MQTT connection fails to create its streams), and every replica of the
        MQTT streams it serves (sessions and QoS 1 messages) has caught up.

        Not ``/healthz`` alone: it also waits for the retained-message consumers, which
        this fleet never uses and which NATS 2.9 has been seen to leave behind for
        minutes after a node was killed.
        """
        health = self._get(node, "/healthz?js-enabled-only=true")
        if health.get("status") != "ok":
            return False
        if len(self.nodes) == 1:
            return True
        if not (self._get(node, "/jsz").get("meta_cluster") or {}).get("leader"):
            return False
        return self._streams_current()

    def _streams_current(self) -> bool:
        """Every replica of the MQTT session and message streams is current, as their
        leaders see it (true before the first MQTT connection creates them)."""
        found = 0
        for node in self.nodes:
            if not node.running:
                continue
            info = self._get(node, "/jsz?accounts=true&streams=true")
            for account in info.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    cluster = stream.get("cluster") or {}
                    if (
                        stream.get("name") not in _MQTT_STREAMS
                        or cluster.get("leader") != node.name
                    ):
                        continue
                    if not all(r.get("current") for r in cluster.get("replicas") or []):
                        return False
                    found += 1
        return found in (0, len(_MQTT_STREAMS))

    def monitoring(self, path: str, index: int = 0) -> dict[str, Any]:
        """A node's monitoring endpoint (``/connz``, ``/jsz?consumers=true``) as JSON;
        {} if it does not answer."""
        return self._get(self.nodes[index], path)

    def _get(self, node: _Node, path: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON; {} if the node does not answer."""
        url = f"http://{self.bind}:{node.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # loopback http
                info = json.load(resp)
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def kill_node(self, index: int) -> None:
        """SIGKILL one node (its JetStream files stay for the restart)."""
        self._stop_node(self.nodes[index], kill=True)

    def _stop_node(self, node: _Node, *, kill: bool) -> None:
        proc, node.proc = node.proc, None
        log, node.log = node.log, None
        end_process(proc, log, kill=kill)
        if proc is not None:
            self._guard.unwatch(proc.pid)

    def stop(self, *, kill: bool = False) -> None:
        """Stop every node: SIGTERM (a clean shutdown) or SIGKILL."""
        for node in self.nodes:
            self._stop_node(node, kill=kill)

    def restart(self, *, kill: bool = False) -> Self:
        """Restart the cluster one node at a time, so it keeps serving throughout
        (a single node is simply down while it restarts)."""
        for node in self.nodes:
            self._stop_node(node, kill=kill)
            self._spawn(node)
            self._wait_healthy([node], within=_CATCH_UP_TIMEOUT, mqtt_too=False)
        return self

    def fail_one(self) -> None:
        """A node fails: the next one in turn is killed with -9 and started again (the
        fleet's ``broker-restart`` event on a cluster). The others keep serving."""
        index = self._next_failure % len(self.nodes)
        self._next_failure += 1
        self.kill_node(index)
        self.start_node(index)

    def cleanup(self) -> None:
        """Stop every node and remove the runtime directory."""
        self.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self._guard.close()

    def log_tail(self, lines: int = 20, *, index: int = 0) -> str:
        """The last lines of one node's log."""
        path = self.nodes[index].directory / "nats-server.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
