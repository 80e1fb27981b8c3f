"""The local control API: one verb per request, the same for the socket and the CLI.

Requests and replies are single JSON lines over a Unix socket that only the
agent's user can open (mode 0600 in a 0700 directory). ``act`` carries out a
request on the device; the daemon calls it for socket clients and the CLI
calls it directly when no daemon runs. Replies carry counts and IDs, never
personal values, except ``export``, which is the user's own record (P11).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from agent.core.consent import Reason
from agent.core.location import parse_precision
from agent.core.purposes import parse_purpose
from agent.device import Device
from agent.errors import AgentError, ControlError, DaemonUnreachable
from agent.runtime.collectors import with_network

STARTED: Final = time.monotonic()  # the simulated crash's uptime counts from here
log = logging.getLogger("smartmi.control")

MAX_REQUEST: Final = 64 * 1024
VERBS: Final = (
    "status",
    "bind",
    "unbind",
    "factory-reset",
    "account-cancelled",
    "consent",
    "location",
    "export",
    "crash",
)


def _number(request: dict[str, Any], key: str) -> float:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(f"{key} must be a number")
    return float(value)


def _consent(device: Device, request: dict[str, Any], *, now: float) -> dict[str, Any]:
    """``consent grant|withdraw PURPOSE``: what changed, and whether it is in force."""
    purpose = parse_purpose(str(request.get("purpose")))
    if request.get("action") == "grant":
        changed = device.grant(purpose, now=now)
        # Say whether it is in force: a minor's binding or a suspension keeps it off.
        decision = device.decide(purpose)
        done: dict[str, Any] = {"granted": purpose.value, "changed": changed}
        done["in_force"] = decision.allowed
        if not decision.allowed:
            done["not_in_force_because"] = _WHY.get(decision.reason, decision.reason.value)
        return done
    if request.get("action") == "withdraw":
        removed = device.withdraw(purpose, now=now)
        return {"withdrawn": purpose.value, "pending_items_deleted": removed}
    raise ControlError("consent action must be grant or withdraw")


def _location(device: Device, request: dict[str, Any], *, now: float) -> dict[str, Any]:
    """``location set LAT LON`` or ``location precision LEVEL``."""
    if request.get("action") == "set":
        loc = device.set_location(_number(request, "lat"), _number(request, "lon"), now=now)
        if loc is None:
            return {"stored": None, "why": "location precision is off: nothing is stored"}
        return {"stored": loc.to_json()}
    if request.get("action") == "precision":
        level = parse_precision(str(request.get("level")))
        device.set_precision(level, now=now)
        return {"precision": level.value}
    raise ControlError("location action must be set or precision")


_WHY: dict[Reason, str] = {
    Reason.MINOR: "the binding is a minor's: no personal data at all (P5)",
    Reason.SUSPENDED: "collection is suspended until the cloud resumes it (P13)",
    Reason.NOT_BOUND: "the device is not bound; it counts once it is",
    Reason.STALE_POLICY: "the grant is for an earlier policy version (P6)",
    Reason.NOT_DURABLE: "a narrowing or wipe is not yet on disk (see status.storage)",
}


def act(  # noqa: PLR0911  # one branch per verb
    device: Device, request: dict[str, Any], *, now: float
) -> dict[str, Any]:
    """Carry out one control request; raises AgentError with a message for the user."""
    verb = request.get("verb")
    if verb == "status":
        return device.status()
    if verb == "bind":
        binding = str(request.get("binding_id") or f"local-{int(now)}")
        minor = bool(request.get("minor", False))
        device.bind(binding, now=now, minor=minor)
        return {"bound": binding, "minor": minor, "lifecycle": device.lifecycle.value}
    if verb in ("unbind", "factory-reset", "account-cancelled"):
        method = {
            "unbind": device.unbind,
            "factory-reset": device.factory_reset,
            "account-cancelled": device.account_cancelled,
        }[verb]
        return {"wiped": True, "deletion_request": method(now=now)}
    if verb == "consent":
        return _consent(device, request, now=now)
    if verb == "location":
        return _location(device, request, now=now)
    if verb == "export":
        return device.export(now=now)
    if verb == "crash":
        report = with_network(
            "simulated crash (smartmi-agent crash --simulate)",
            'Traceback (most recent call last):\n  File "agent/cli.py", line 1\n'
            "RuntimeError: simulated",
            time.monotonic() - STARTED,
        )
        return {"queued": device.capture_crash(report, now=now)}
    raise ControlError(f"unknown verb {str(verb)[:32]!r}; use one of {', '.join(VERBS)}")


Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_DEPTH: Final = 16  # a request is a flat object; nesting beyond this is refused unparsed


def _decode(line: bytes) -> dict[str, Any]:
    """One request line as a JSON object; ControlError for anything else."""
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request too large (over {MAX_REQUEST} bytes)")
    depth = deepest = 0
    for byte in line:  # counted before parsing: a deep document never reaches json
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise ControlError(f"request nested {deepest} deep, at most {MAX_DEPTH}")
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise ControlError(f"a request is one JSON object on one line: {exc}") from None
    if not isinstance(request, dict):
        raise ControlError("a request is a JSON object")
    return request


def _prepare(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket left by a process that died; we hold the state lock


async def private_unix_server(
    path: Path,
    client: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    limit: int,
) -> asyncio.Server:
    """A Unix socket server at ``path`` that only this user may connect to (0600)."""
    _prepare(path)
    old = os.umask(0o177)  # the socket is created 0600: only the agent's user may use it
    try:
        server = await asyncio.start_unix_server(client, path=str(path), limit=limit)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)  # a syscall, not pathlib I/O in a coroutine
    return server


async def serve(path: Path, handler: Handler) -> asyncio.Server:
    """Listen on ``path`` (owner-only); each line is a request, each reply a line."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = _decode(line)
                reply: dict[str, Any] = {"ok": True, "result": handler(request)}
            except (AgentError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # noqa: BLE001  # every request is answered, the daemon lives
                # A fault of ours, not the device's software crashing: logged with its
                # type, never turned into a crash report or a dead control socket.
                log.error("control request failed", extra={"error": type(exc).__name__})  # noqa: TRY400
                reply = {"ok": False, "error": f"internal error ({type(exc).__name__}), logged"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("control client failed", extra={"error": type(exc).__name__})
        finally:
            writer.close()

    return await private_unix_server(path, client, limit=MAX_REQUEST + 2)


def request(path: Path, body: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a running daemon (blocking); ControlError if it cannot."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(body).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise DaemonUnreachable(f"cannot talk to the daemon at {path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"the daemon sent a reply that is not JSON: {data[:80]!r}") from exc
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the daemon refused the request")))
    result = reply.get("result")
    return result if isinstance(result, dict) else {"result": result}
