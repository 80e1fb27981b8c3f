"""Collectors: network facts, crash files of other processes, the agent's own crashes.

What a collector finds goes through ``Device.capture_crash``, which gates it on
diagnostics consent and scrubs it (P1, P12). Without consent a crash file is
deleted unread beyond what it takes to know it is a crash file: it is not
collected and not kept.

Other device processes drop crash reports into the crash directory, written to a
dot-file and renamed into place so a half-written file is never read. A report
is JSON (``{"signature": ..., "stack": ..., "uptime_s": ...}``) or plain text
(first line the signature, the whole text the stack). A file that is neither is
renamed ``*.invalid`` and left for inspection; a wipe removes it with the rest.
A file being captured is first renamed ``.smartmi-capturing-MSG_ID`` (a claim), so
that a kill at any point leaves it captured exactly once (``CrashDirCollector._take``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import faulthandler
import fcntl
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import struct
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TextIO

from agent.core.purposes import Purpose
from agent.device import CrashReport, Device
from agent.errors import AgentError, SchemaError, StorageError
from agent.store.fsutil import fsync_dir

log = logging.getLogger("smartmi.collectors")

MAX_CRASH_FILE: Final = 256 * 1024
FATAL_LOG: Final = "agent-fatal.log"  # faulthandler writes here; never read while live
CLAIM: Final = ".smartmi-capturing-"  # a crash file being captured: CLAIM + its msg_id
CLAIMED: Final = re.compile(re.escape(CLAIM) + r"([0-9a-f]{32})")
_SIOCGIFADDR: Final = 0x8915
_RTF_GATEWAY: Final = 0x2


@dataclass(frozen=True, slots=True)
class NetInfo:
    """The device's addresses and routes, as sent in crash diagnostics."""

    ip_addresses: tuple[str, ...] = ()
    default_gateway: str | None = None
    routes: tuple[dict[str, Any], ...] = ()


def _le_ipv4(hex_text: str) -> str:
    return str(ipaddress.IPv4Address(struct.pack("<I", int(hex_text, 16))))


def parse_proc_route(text: str) -> tuple[str | None, tuple[dict[str, Any], ...]]:
    """The default gateway and the IPv4 routes from Linux's ``/proc/net/route``."""
    gateway: str | None = None
    routes: list[dict[str, Any]] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:  # Iface Destination Gateway Flags ... Mask
            continue
        try:
            dest, gw, mask = _le_ipv4(fields[1]), _le_ipv4(fields[2]), _le_ipv4(fields[7])
            flags = int(fields[3], 16)
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        except ValueError:
            continue
        routes.append(
            {
                "destination": f"{dest}/{prefix}",
                "gateway": None if gw == "0.0.0.0" else gw,  # noqa: S104  # on-link, not a bind
                "interface": fields[0][:32],
            }
        )
        if prefix == 0 and flags & _RTF_GATEWAY and gateway is None:
            gateway = gw
    return gateway, tuple(routes[:32])


def parse_if_inet6(text: str) -> tuple[str, ...]:
    """Global IPv6 addresses from Linux's ``/proc/net/if_inet6``."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or len(fields[0]) != 32:  # 128 bits in hex
            continue
        addr = ipaddress.IPv6Address(int(fields[0], 16))
        if addr.is_global:
            out.append(str(addr))
    return tuple(out)


def _ipv4_addresses() -> tuple[str, ...]:
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            if name == "lo":
                continue
            try:
                packed = fcntl.ioctl(
                    sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15])
                )
            except OSError:
                continue  # the interface has no IPv4 address
            out.append(socket.inet_ntoa(packed[20:24]))
    return tuple(out)


def network_snapshot(proc: Path = Path("/proc/net")) -> NetInfo:
    """Addresses and routes from the OS; empty where the platform does not expose them."""
    try:
        gateway, routes = parse_proc_route((proc / "route").read_text())
    except OSError:
        gateway, routes = None, ()
    addresses: tuple[str, ...] = ()
    try:
        addresses = _ipv4_addresses()
    except (OSError, AttributeError):
        addresses = ()
    with contextlib.suppress(OSError):
        addresses += parse_if_inet6((proc / "if_inet6").read_text())
    return NetInfo(addresses[:16], gateway, routes)


def with_network(signature: str, stack: str, uptime_s: float) -> CrashReport:
    """A crash report carrying the device's addresses and routes as they are now."""
    net = network_snapshot()
    return CrashReport(
        signature=signature,
        stack=stack,
        ip_addresses=net.ip_addresses,
        default_gateway=net.default_gateway,
        routes=net.routes,
        uptime_s=uptime_s,
    )


def read_crash_file(path: Path) -> bytes:
    """A crash file's bytes, read safely from a directory other users can write to.

    A symbolic link is refused, not followed (it could point at the agent's keys), as
    is anything but a regular file (a FIFO would block) and a file over the size cap.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("a symbolic link, not a crash file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_CRASH_FILE:
            raise ValueError(f"larger than {MAX_CRASH_FILE} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_CRASH_FILE + 1)
    finally:
        os.close(fd)


def parse_crash_file(data: bytes) -> tuple[str, str, float]:
    """(signature, stack, uptime_s) from a crash file's bytes; ValueError if unusable."""
    if len(data) > MAX_CRASH_FILE:
        raise ValueError(f"larger than {MAX_CRASH_FILE} bytes")
    text = data.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("stack"), str):
            raise ValueError("a JSON crash report needs a string 'stack'")
        uptime = doc.get("uptime_s", 0.0)
        uptime = float(uptime) if isinstance(uptime, int | float) else 0.0
        return str(doc.get("signature") or "unknown"), doc["stack"], uptime
    if not text.strip():
        raise ValueError("empty")
    first = text.strip().splitlines()[-1]  # Python tracebacks end with the error line
    return first, text, 0.0


class CrashDirCollector:
    """Picks up crash files from the crash directories and captures them: the agent's
    own (private) and the drop directory other processes write to."""

    def __init__(self, device: Device, *crash_dirs: Path, started: float) -> None:
        self.device = device
        self.crash_dirs = crash_dirs
        self.started = started
        self.captured = 0
        self.discarded = 0
        self.invalid = 0

    def counts(self) -> dict[str, int]:
        """Crash files handled so far, by outcome."""
        return {
            "captured": self.captured,
            "discarded_without_consent": self.discarded,
            "invalid": self.invalid,
        }

    def _candidates(self) -> list[Path]:
        found: list[Path] = []
        for crash_dir in self.crash_dirs:
            try:
                if not crash_dir.is_dir():
                    continue
                found += sorted(
                    p
                    for p in crash_dir.iterdir()
                    if not p.is_dir()
                    and (
                        CLAIMED.fullmatch(p.name) is not None
                        or (
                            not p.name.startswith(".")
                            and p.suffix != ".invalid"
                            and p.name != FATAL_LOG
                        )
                    )
                )
            except OSError as exc:  # one unusable directory does not hold up the other
                _unusable(crash_dir, exc)
        return found

    def scan(self, now: float) -> int:
        """Process every waiting crash file once; returns how many were captured. A file
        that cannot be renamed or removed ends this scan, logged with its directory."""
        done = 0
        for path in self._candidates():
            try:
                done += self._take(path, now)
            except OSError as exc:
                _unusable(path.parent, exc)
                break
        return done

    def _take(self, path: Path, now: float) -> int:
        """Capture, refuse or discard one crash file; 1 if it was captured.

        Exactly once across a kill: the file is renamed to a claim with the item's
        msg_id before the capture, which notes the claim in its own transaction, and
        deleted after. A claim found later was captured (the note says so: the file
        goes) or not (it is captured now, with that msg_id).
        """
        claimed = CLAIMED.fullmatch(path.name)
        msg_id = claimed.group(1) if claimed else None
        if msg_id is not None and self._settled(path, msg_id):
            return 0
        try:
            signature, stack, uptime = parse_crash_file(read_crash_file(path))
        except (OSError, ValueError) as exc:
            self.invalid += 1
            log.warning("crash file unusable", extra={"file": path.name, "error": str(exc)})
            path.rename(_invalid(path, msg_id))
            return 0
        if not self.device.decide(Purpose.DIAGNOSTICS).allowed:
            self.discarded += 1  # P1: not collected without diagnostics consent
            path.unlink(missing_ok=True)
            return 0
        report = with_network(signature, stack, uptime or max(0.0, now - self.started))
        if msg_id is None:
            msg_id = uuid.uuid4().hex
            claim = path.with_name(CLAIM + msg_id)
            path.rename(claim)
            fsync_dir(path.parent)  # the claim is on disk before the capture commits
            path = claim
        return self._capture(path, report, now, msg_id)

    def _capture(self, path: Path, report: CrashReport, now: float, msg_id: str) -> int:
        """Capture the claimed crash file ``path``; 1 if it was captured."""
        try:
            self.device.capture_crash_file(report, now=now, msg_id=msg_id)
        except SchemaError as exc:
            self.invalid += 1
            log.warning("crash report refused", extra={"file": path.name, "error": str(exc)})
            path.rename(_invalid(path, msg_id))
            return 0
        except StorageError as exc:
            # Dropped and counted by the device (never half-written); the file goes, so
            # a full disk does not fill with a backlog of crashes.
            log.warning(
                "crash dropped: the store refused it",
                extra={"file": path.name, "kind": exc.kind},
            )
            path.unlink(missing_ok=True)
            return 0
        except AgentError as exc:
            log.warning("crash not captured", extra={"error": str(exc)})
            return 0  # left in place, tried again on the next scan
        self.captured += 1
        path.unlink(missing_ok=True)
        self._gone(msg_id)
        return 1

    def _settled(self, path: Path, msg_id: str) -> bool:
        """Whether a claim needs nothing more now: it was captured before a stop (the
        file goes), or the store cannot say so yet (it stays for the next scan, never
        captured twice). False: it was not captured, and is captured now."""
        try:
            captured = self.device.crash_file_captured(msg_id)
        except StorageError as exc:
            log.warning(
                "crash file left for the next scan: the store cannot say if it was captured",
                extra={"msg_id": msg_id, "kind": exc.kind},
            )
            return True
        if captured:
            log.info("crash file captured before a stop: deleted", extra={"msg_id": msg_id})
            path.unlink(missing_ok=True)
            self._gone(msg_id)
        return captured

    def _gone(self, msg_id: str) -> None:
        """The claimed file is deleted; a note the store cannot delete now is harmless."""
        try:
            self.device.crash_file_gone(msg_id)
        except StorageError as exc:
            log.warning("crash file note not deleted", extra={"error": str(exc)})

    async def run(self, interval: float = 5.0) -> None:
        """Scan every ``interval`` seconds (a stat of one directory: no busy polling).

        A directory that cannot be read or written is logged and tried again; it never
        ends the daemon.
        """
        while True:
            self.scan(time.time())  # logs what it cannot use, never raises OSError
            await asyncio.sleep(interval)


def _invalid(path: Path, msg_id: str | None) -> Path:
    """Where an unusable crash file is left for inspection (a claim gets a visible name)."""
    name = f"crash-{msg_id}" if msg_id is not None and path.name.startswith(".") else path.name
    return path.with_name(name + ".invalid")


def _unusable(crash_dir: Path, exc: OSError) -> None:
    log.error(  # the errno says it
        "crash directory unusable",
        extra={"dir": str(crash_dir), "error": exc.strerror or str(exc)},
    )


def _write_report(crash_dir: Path, signature: str, stack: str) -> None:
    crash_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"agent-{time.time_ns()}.json"
    tmp = crash_dir / f".{name}.tmp"
    tmp.write_text(json.dumps({"signature": signature, "stack": stack}))
    tmp.rename(crash_dir / name)


def install_crash_hooks(crash_dir: Path, loop: asyncio.AbstractEventLoop) -> TextIO:
    """Turn the agent's own crashes into crash files; returns the fatal-signal log."""
    crash_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fatal = crash_dir / FATAL_LOG
    if fatal.exists() and fatal.stat().st_size:
        # The last run died on a fatal signal: its dump becomes a crash report.
        fatal.rename(crash_dir / f"agent-fatal-{time.time_ns()}.txt")
    stream = fatal.open("w", encoding="utf-8")
    faulthandler.enable(file=stream)

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        _write_report(crash_dir, kind.__name__, "".join(traceback.format_exception(exc)))
        sys.__excepthook__(kind, exc, tb)

    def loop_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            _write_report(crash_dir, type(exc).__name__, "".join(traceback.format_exception(exc)))
        loop.default_exception_handler(context)

    sys.excepthook = excepthook
    loop.set_exception_handler(loop_handler)
    return stream
