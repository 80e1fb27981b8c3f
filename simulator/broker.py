"""Start, restart and stop a local Mosquitto rendered from ``broker-config/``.

Used by ``smartmi-sim broker up``, the fleet simulator, the test fixtures and the
benchmarks, so that all of them run the very configuration that is documented.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol, Self

from agent.errors import BrokerError
from simulator.guard import Guard
from simulator.pki import DevPki

if TYPE_CHECKING:
    from simulator.jetstream import JetStreamAt

_SEARCH_PATH: Final = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
_START_TIMEOUT: Final = 15.0


def repo_broker_config() -> Path:
    """The ``broker-config/`` directory: SMARTMI_BROKER_CONFIG if set, else the
    checkout's, else the installed copy (PREFIX/share/smartmi-agent/broker-config)."""
    env = os.environ.get("SMARTMI_BROKER_CONFIG")
    if env:
        places = [Path(env)]
    else:
        places = [
            Path(__file__).resolve().parent.parent / "broker-config",  # a checkout
            Path(sys.prefix) / "share" / "smartmi-agent" / "broker-config",  # pip, pipx
        ]
    for path in places:
        if (path / "mosquitto.conf").is_file():
            return path
    looked = " or ".join(str(p) for p in places)
    raise BrokerError(
        f"broker configuration not found at {looked}; reinstall the package, or set "
        "SMARTMI_BROKER_CONFIG to a broker-config/ directory"
    )


def find_binary(name: str, package: str) -> str:
    """The path of a program, or a BrokerError naming the Debian package to install."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SEARCH_PATH))
    if not found:
        raise BrokerError(
            f"the '{name}' binary was not found; install it with "
            f"'sudo apt-get install {package}' (Debian / Raspberry Pi OS)"
        )
    return found


def find_mosquitto() -> str:
    """The path of the mosquitto binary, or a BrokerError naming the package to install."""
    return find_binary("mosquitto", "mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def listen_port(bind: str) -> int:
    """A free TCP port on ``bind`` outside the kernel's ephemeral range.

    Nodes connect to each other as they start; a port merely free at the time it was
    chosen (``free_port``) can be taken by such an outgoing connection before the node
    that was to listen on it binds it, which has been seen to fail a start.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))  # noqa: S311  # not a secret
        with socket.socket(family, socket.SOCK_STREAM) as s, contextlib.suppress(OSError):
            s.bind((bind, port))
            return port
    return free_port(bind)


def _mosquitto_user() -> pwd.struct_passwd | None:
    """The account mosquitto drops to when started as root, if there is one."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


def require_free(host: str, port: int) -> None:
    """A BrokerError if something already listens on ``host:port`` (the readiness check
    would take that listener for the broker just started)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise BrokerError(
                f"port {port} on {host} is not free ({exc.strerror}): another broker may be "
                "running there; stop it, or choose another port with --port"
            ) from None


def end_process(
    proc: subprocess.Popen[bytes] | None, log: int | None, *, kill: bool, wait_s: float = 15
) -> None:
    """Stop a broker process (SIGTERM, or SIGKILL with ``kill``; SIGKILL if it lingers
    ``wait_s``) and close its log file descriptor."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        os.close(log)


def memory_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A memory figure (KiB) of a process from ``/proc/PID/status``: ``VmRSS`` (resident
    now) or ``VmHWM`` (its peak); 0 where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class LocalBroker(Protocol):
    """What the simulator needs of a broker it started: Mosquitto or a NATS cluster."""

    protocol: Literal["v5", "v311"]
    backend_persistent: bool

    @property
    def host(self) -> str: ...
    @property
    def jetstream(self) -> JetStreamAt | None: ...
    @property
    def port(self) -> int: ...
    @property
    def ports(self) -> list[int]: ...
    @property
    def url(self) -> str: ...
    @property
    def log_path(self) -> Path: ...
    @property
    def running(self) -> bool: ...
    def authorize(self, device_ids: Iterable[str]) -> None: ...
    def peak_rss_kib(self) -> int: ...
    def start(self) -> Self: ...
    def restart(self, *, kill: bool = False) -> Self: ...
    def cleanup(self) -> None: ...
    def log_tail(self, lines: int = 20) -> str: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class MosquittoBroker:
    """One local Mosquitto process on loopback with the fleet's TLS configuration."""

    protocol: Literal["v5", "v311"] = "v5"
    # The backend starts clean on every connection (see simulator/cloud.py).
    backend_persistent = False

    @property
    def jetstream(self) -> JetStreamAt | None:
        """None: the backend subscribes to up/ over MQTT."""
        return None

    def __init__(
        self,
        pki: DevPki,
        *,
        port: int | None = None,
        bind: str = "127.0.0.1",
        config_dir: Path | None = None,
        connection_messages: bool = False,
    ) -> None:
        if port is not None and not 0 < port < 65536:  # TCP's range
            raise BrokerError(f"--port {port}: a TCP port is 1 to 65535")
        self.pki = pki.ensure()
        self.bind = bind
        self.port = port or free_port(bind)
        self.config_dir = config_dir or repo_broker_config()
        self.connection_messages = connection_messages
        self.binary = find_mosquitto()
        # A fresh directory under the system temp dir, not inside the caller's tree:
        # as root, mosquitto drops to the 'mosquitto' user, which cannot traverse
        # private directories such as /root or pytest's 0700 basetemp.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="smartmi-broker-"))
        # Whatever kills us (SIGKILL too), the broker and this directory go with us.
        self._guard = Guard(self.runtime_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: int | None = None
        try:
            self._render()
        except BaseException:
            self._guard.close()
            raise

    @property
    def host(self) -> str:
        """The address clients connect to."""
        return self.bind

    @property
    def ports(self) -> list[int]:
        """The one MQTT port."""
        return [self.port]

    def authorize(self, device_ids: Iterable[str]) -> None:
        """Nothing to do: the ACL's patterns cover every device by its certificate."""
        del device_ids

    def peak_rss_kib(self) -> int:
        """The broker process's peak resident memory so far (KiB); 0 if it is not running."""
        return memory_kib(self._proc.pid, "VmHWM") if self.running and self._proc else 0

    @property
    def url(self) -> str:
        """An ``mqtts://`` URL for this broker."""
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"mqtts://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the broker's log goes."""
        return self.runtime_dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _render(self) -> None:
        rd = self.runtime_dir
        (rd / "data").mkdir()
        shutil.copyfile(self.pki.ca_cert, rd / "ca.pem")
        shutil.copyfile(self.pki.broker.cert, rd / "broker.pem")
        shutil.copyfile(self.pki.broker.key, rd / "broker.key")
        shutil.copyfile(self.config_dir / "acl", rd / "acl")
        template = string.Template((self.config_dir / "mosquitto.conf").read_text())
        try:
            text = template.substitute(
                port=self.port,
                bind=self.bind,
                acl_file=rd / "acl",
                cafile=rd / "ca.pem",
                certfile=rd / "broker.pem",
                keyfile=rd / "broker.key",
                data_dir=rd / "data",
                connection_messages="true" if self.connection_messages else "false",
            )
        except (KeyError, ValueError) as exc:
            raise BrokerError(f"bad field in {self.config_dir / 'mosquitto.conf'}: {exc}") from exc
        (rd / "mosquitto.conf").write_text(text)
        os.chmod(rd / "broker.key", 0o600)
        user = _mosquitto_user()
        if user is not None:
            for path in [rd, *rd.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> Self:
        """Start mosquitto and wait until it accepts TCP connections."""
        if self.running:
            return self
        require_free(self.bind, self.port)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._log_file = log
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.runtime_dir / "mosquitto.conf")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker
        )
        self._guard.watch(self._proc.pid)  # its own session: the group is its pid
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self._proc.returncode} at start; "
                    f"its log:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.bind, self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.02)  # no readiness event to await: mosquitto has no notify socket
        self.stop()
        raise BrokerError(
            f"mosquitto did not listen on port {self.port} within "
            f"{_START_TIMEOUT:.0f} s; its log:\n{self.log_tail()}"
        )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (it saves its persistence file) or SIGKILL."""
        proc, self._proc = self._proc, None
        log, self._log_file = self._log_file, None
        end_process(proc, log, kill=kill)
        if proc is not None:
            self._guard.unwatch(proc.pid)

    def restart(self, *, kill: bool = False) -> Self:
        """Stop and start again on the same port, keeping persisted sessions."""
        self.stop(kill=kill)
        return self.start()

    def cleanup(self) -> None:
        """Stop the broker and remove its runtime directory."""
        self.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self._guard.close()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()  # nothing left behind by a start that failed
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
