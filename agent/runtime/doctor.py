"""``smartmi-agent doctor``: check an installation and print the fix for each problem.

It reads, never writes: it does not create the state directory, take the state lock or
connect to the broker as the device (an MQTT CONNECT would push a running daemon off
the broker, and a clean session would drop the commands waiting for it). The broker
check is a mutual-TLS handshake, which proves the address, the CA and the client
certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from agent.config import AgentConfig, load_config
from agent.errors import AgentError, ConfigError
from agent.runtime import control
from agent.runtime.tls import check_identity, classify_tls_error, client_context
from agent.store.fsutil import require_private_file
from agent.store.statedir import require_usable

OK: Final = "ok"
WARN: Final = "warn"
FAIL: Final = "FAIL"
CONNECT_TIMEOUT_S: Final = 5.0
ALERT_WAIT_S: Final = 1.0  # TLS 1.3 refuses a client certificate after the handshake
CLOCK_OFF_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's outcome: ``level`` is ok, warn or FAIL; ``fix`` says what to do."""

    check: str
    level: str
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        """The finding as a JSON object."""
        return {"check": self.check, "level": self.level, "detail": self.detail, "fix": self.fix}


def diagnose(config_path: Path, *, now: float | None = None) -> list[Finding]:
    """Every check of the installation configured by ``config_path``."""
    try:
        config = load_config(config_path)
    except AgentError as exc:
        return [Finding("config", FAIL, str(exc), f"edit {config_path}")]
    found = [Finding("config", OK, f"{config_path}: device {config.device.id}")]
    at = time.time() if now is None else now
    for check in _checks(config, at):
        found.extend(check())
    return found


def identity(config: AgentConfig, *, now: float) -> list[Finding]:
    """The checks of the device's certificate, key and CA alone (no network, no state)."""
    return _files(config, now)


def _checks(config: AgentConfig, now: float) -> Iterator[Callable[[], list[Finding]]]:
    yield lambda: _files(config, now)
    yield lambda: _state(config)
    yield lambda: _crash_drop(config)
    yield lambda: _daemon_and_clock(config)
    yield lambda: _broker(config)


def _files(config: AgentConfig, now: float) -> list[Finding]:
    broker = config.broker
    if broker is None:
        return [Finding("broker", FAIL, "no [broker] section", "add [broker] url, ca, cert, key")]
    out: list[Finding] = []
    ca = _certificate(broker.ca, "ca", now, out)
    cert = _certificate(broker.cert, "certificate", now, out)
    try:
        require_private_file(broker.key, "the device's TLS private key")
        check_identity(broker.cert, broker.key, config.device.id)
    except FileNotFoundError:
        out.append(Finding("key", FAIL, f"{broker.key} does not exist", "install the device key"))
    except AgentError as exc:
        out.append(Finding("identity", FAIL, str(exc), _fix_of(exc)))
    else:
        out.append(Finding("identity", OK, f"CN {config.device.id!r}; the key matches"))
    if ca is not None and cert is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            out.append(
                Finding(
                    "certificate",
                    FAIL,
                    f"{broker.cert} was not issued by the CA in {broker.ca}",
                    "use the certificate your CA issued for this device, or its CA as [broker] ca",
                )
            )
    return out


def _certificate(path: Path, check: str, now: float, out: list[Finding]) -> x509.Certificate | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        out.append(Finding(check, FAIL, f"{path} does not exist", f"install it as {path}"))
        return None
    except OSError as exc:
        out.append(Finding(check, FAIL, f"cannot read {path}: {exc.strerror}", f"chmod 644 {path}"))
        return None
    except ValueError:
        out.append(Finding(check, FAIL, f"{path} is not a PEM certificate", "install the PEM file"))
        return None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    if when < start:
        out.append(
            Finding(
                check,
                FAIL,
                f"{path} is valid only from {start:%Y-%m-%d %H:%M} UTC; this machine's clock "
                f"says {when:%Y-%m-%d %H:%M} UTC",
                "set the clock: timedatectl set-ntp true (or date -s)",
            )
        )
    elif when > end:
        out.append(
            Finding(
                check,
                FAIL,
                f"{path} expired on {end:%Y-%m-%d}",
                "issue a new certificate (smartmi-sim pki device ID for a lab), or set the clock",
            )
        )
    else:
        days = (end - when).days
        level = WARN if days < 30 else OK
        fix = "renew it before it expires" if level == WARN else ""
        out.append(Finding(check, level, f"{path}: valid until {end:%Y-%m-%d} ({days} days)", fix))
    return cert


def _state(config: AgentConfig) -> list[Finding]:
    state = config.state_dir
    if not state.exists():
        parent = next(p for p in state.absolute().parents if p.exists())  # "/" exists
        if os.access(parent, os.W_OK):
            return [Finding("state", OK, f"{state} does not exist yet; the agent makes it 0700")]
        return [
            Finding(
                "state",
                FAIL,
                f"{state} does not exist and {parent} is not writable by this user",
                f"install -d -m 0700 -o $(id -un) {state} (systemd's StateDirectory= does this)",
            )
        ]
    try:
        require_usable(state)
    except AgentError as exc:
        return [Finding("state", FAIL, str(exc), _fix_of(exc))]
    except OSError as exc:
        return [Finding("state", FAIL, f"{state}: {exc.strerror}", f"check {state}'s owner")]
    return [Finding("state", OK, f"{state}: private, owned by this user")]


def _crash_drop(config: AgentConfig) -> list[Finding]:
    drop = config.crash_dir
    if drop == config.own_crash_dir:
        return [
            Finding(
                "crash-drop",
                OK,
                f"{drop}: inside the private state directory; only the agent's own crashes",
            )
        ]
    try:
        st = drop.stat()
    except FileNotFoundError:
        return [
            Finding(
                "crash-drop",
                FAIL,
                f"{drop} does not exist: other processes cannot drop crash reports",
                "systemd-tmpfiles --create /etc/tmpfiles.d/smartmi-agent.conf",
            )
        ]
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o003 != 0o003 or not mode & stat.S_ISVTX:
        return [
            Finding(
                "crash-drop",
                WARN,
                f"{drop} has mode {mode:04o}: other processes cannot drop reports there, or "
                "can remove each other's",
                f"chmod 1733 {drop}",
            )
        ]
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        return [
            Finding(
                "crash-drop",
                FAIL,
                f"{drop} belongs to uid {st.st_uid}: the agent cannot remove handled reports",
                f"chown {os.geteuid()} {drop}",
            )
        ]
    return [Finding("crash-drop", OK, f"{drop}: mode {mode:04o}")]


def _daemon_and_clock(config: AgentConfig) -> list[Finding]:
    out: list[Finding] = []
    offset: float | None = None
    sock = config.socket_path
    try:
        status = control.request(sock, {"verb": "status"}) if sock.exists() else None
    except AgentError:
        status = None
    if status is None:
        out.append(Finding("daemon", OK, f"not running (no answer on {sock})"))
    else:
        raw = status.get("clock_offset_s")
        offset = float(raw) if isinstance(raw, int | float) else None
        out.append(Finding("daemon", OK, f"running; lifecycle {status.get('lifecycle')}"))
    if offset is not None and abs(offset) > CLOCK_OFF_S:
        out.append(
            Finding(
                "clock",
                WARN,
                f"this clock is {offset:+.0f} s off the cloud's (from its last command); "
                "the agent narrows when unsure, so choices may wait",
                "timedatectl set-ntp true",
            )
        )
    synced = _ntp_synchronized()
    if synced is False:
        out.append(
            Finding(
                "clock",
                WARN,
                "the system clock is not synchronised (timedatectl NTPSynchronized=no)",
                "timedatectl set-ntp true",
            )
        )
    elif offset is None or abs(offset) <= CLOCK_OFF_S:
        source = "synchronised" if synced else "no NTP status here"
        known = "" if offset is None else f"; {offset:+.1f} s off the cloud's"
        out.append(Finding("clock", OK, f"{source}{known}"))
    return out


def _ntp_synchronized() -> bool | None:
    """timedatectl's NTPSynchronized, or None where there is no systemd."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return None
    try:
        done = subprocess.run(  # a fixed argument list
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = done.stdout.strip()
    return {"yes": True, "no": False}.get(value) if done.returncode == 0 else None


def _broker(config: AgentConfig) -> list[Finding]:
    broker = config.broker
    if broker is None:
        return []
    try:
        ctx = client_context(broker.ca, broker.cert, broker.key)
    except AgentError as exc:
        return [Finding("broker", FAIL, f"no TLS context: {exc}", "fix the files above first")]
    return [_handshake(ctx, host, port) for host, port in broker.endpoints]


def _handshake(ctx: ssl.SSLContext, host: str, port: int) -> Finding:
    where = f"{host}:{port}"
    started = time.perf_counter()
    try:
        with (
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            took = (time.perf_counter() - started) * 1000
            tls.settimeout(ALERT_WAIT_S)
            with contextlib.suppress(TimeoutError):
                tls.recv(1)  # an MQTT broker says nothing before CONNECT; an alert shows here
            return Finding("broker", OK, f"{where}: mutual TLS ({tls.version()}) in {took:.0f} ms")
    except ConnectionRefusedError:
        return Finding(
            "broker",
            FAIL,
            f"{where}: connection refused, nothing listens there",
            "start the broker, or correct [broker] url",
        )
    except TimeoutError:
        return Finding(
            "broker",
            FAIL,
            f"{where}: no answer within {CONNECT_TIMEOUT_S:.0f} s",
            "check the address, the network and any firewall",
        )
    except socket.gaierror as exc:
        return Finding(
            "broker", FAIL, f"{host}: unknown host ({exc.strerror})", "correct [broker] url"
        )
    except (ssl.SSLError, ConnectionResetError, OSError) as exc:
        problem = classify_tls_error(exc)
        kind = problem.kind if problem is not None else ""
        if _alert_from_broker(exc) and kind not in ("expired", "revoked"):
            kind = "client-certificate-refused"  # its alert is about our certificate
        return Finding(
            "broker",
            FAIL,
            f"{where}: {kind or 'TLS failed'}: {exc}",
            _TLS_FIX.get(kind, _TLS_OTHER),
        )


def _alert_from_broker(exc: BaseException) -> bool:
    """An alert the broker sent (about our certificate), not our own verification."""
    if isinstance(exc, ssl.SSLCertVerificationError) or not isinstance(exc, ssl.SSLError):
        return False
    reason = str(getattr(exc, "reason", "") or "")
    return reason.startswith(("TLSV1_ALERT", "SSLV3_ALERT", "TLSV13_ALERT"))


_TLS_FIX: Final = {
    "unknown-ca": "[broker] ca is not the CA that signed the broker's certificate",
    "hostname-mismatch": "use the host name the broker's certificate was issued for",
    "client-certificate-refused": "the broker does not trust this device's certificate: "
    "issue it from the broker's CA",
    "expired": "renew the expired certificate, or set the clock",
    "not-yet-valid": "set the clock: timedatectl set-ntp true",
    "revoked": "the certificate was revoked: issue a new one",
}
_TLS_OTHER: Final = "check that [broker] url is the broker's TLS port"


def _fix_of(exc: AgentError) -> str:
    fix = getattr(exc, "fix", "")
    if fix:
        return str(fix)
    if isinstance(exc, ConfigError):
        return "correct the file or [broker] setting named above"
    return "see the message"


def render(findings: list[Finding]) -> str:
    """The findings as aligned lines, each problem followed by its fix."""
    width = max(len(f.check) for f in findings)
    lines = []
    for f in findings:
        lines.append(f"{f.level:<4}  {f.check:<{width}}  {f.detail}")
        if f.fix and f.level != OK:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {f.fix}")
    problems = sum(f.level == FAIL for f in findings)
    warnings = sum(f.level == WARN for f in findings)
    if problems or warnings:
        lines.append(f"{problems} problem(s), {warnings} warning(s)")
    else:
        lines.append("everything checked is fine")
    return "\n".join(lines)
