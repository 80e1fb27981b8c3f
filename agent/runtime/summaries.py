"""What a person reads after a verb of ``smartmi-agent``: a few lines of text from the
same result a script gets with ``--json``.

Times are shown as the result gives them (RFC 3339, UTC). Nothing here decides
anything: each verb's result is rendered as it is, and a field this module does not
know is left to ``--json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _n(count: object, noun: str, plural: str | None = None) -> str:
    """``1 entry``, ``2 entries``."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "none"


def _daemon_line(result: dict[str, Any], sock: str, state_dir: str) -> str:
    transport = result.get("transport")
    if not isinstance(transport, dict):
        return f"daemon      not running (no answer at {sock}); read from {state_dir}"
    link = "connected" if transport.get("connected") else "not connected"
    synced = "commands synced" if transport.get("commands_synced") else "commands not synced"
    line = (
        f"daemon      running: {link}, {synced}; {transport.get('published', 0)} published, "
        f"{transport.get('acknowledged', 0)} acknowledged, "
        f"{transport.get('commands_applied', 0)} commands applied"
    )
    if transport.get("last_error"):
        line += f"; last error: {transport['last_error']}"
    return line


def status(result: dict[str, Any], *, sock: str, state_dir: str) -> str:
    """``status``: whether the daemon runs and what it did, then the device's state."""
    lines = [_daemon_line(result, sock, state_dir)]
    lifecycle = str(result.get("lifecycle"))
    due = result.get("activation_due")
    if due:
        lifecycle += f" (activation due: {due})"
    lines.append(
        f"device      {result.get('device_id')}, {lifecycle}, policy {result.get('policy_version')}"
        + (", a minor's account: no personal data" if result.get("minor") else "")
    )
    consent = result.get("consent") or {}
    lines.append("consent     " + ", ".join(f"{p} {s}" for p, s in sorted(consent.items())))
    if result.get("suspended"):
        lines.append("suspended   yes: nothing personal is collected or sent until resumed")
    location = "set" if result.get("location_set") else "not set"
    lines.append(f"location    {location}, precision {result.get('precision')}")
    lines.append(
        f"outbox      {result.get('queued', 0)} queued, {result.get('in_flight', 0)} in flight; "
        f"dropped: {_counts(result.get('dropped') or {})}"
    )
    lines.append(
        f"deletions   {_n(result.get('deletion_requests_pending', 0), 'request')} pending"
        + (
            f"; {result['deletion_requests_lost']} lost with both copies, each sent as a "
            "request naming the device only"
            if result.get("deletion_requests_lost")
            else ""
        )
    )
    storage = result.get("storage") or {}
    if storage.get("ok", True):
        lines.append("storage     ok")
    else:
        lines.append(f"storage     PROBLEM ({storage.get('kind')}): {storage.get('error')}")
    if result.get("quarantined"):
        lines.append(
            f"quarantine  {_n(result['quarantined'], 'record')} failed the integrity check"
        )
    problems = result.get("identity")
    if problems == []:
        lines.append("identity    ok: certificate, key and CA")
    for problem in problems or []:
        fix = f"; fix: {problem['fix']}" if problem.get("fix") else ""
        lines.append(f"identity    {problem['level']} {problem['check']}: {problem['detail']}{fix}")
    files = result.get("crash_files")
    if isinstance(files, dict):
        lines.append(f"crash files {_counts(files)}")
    return "\n".join(lines)


def _bind(r: dict[str, Any]) -> str:
    minor = "; a minor's account: no personal data will be collected" if r.get("minor") else ""
    return f"bound to {r.get('bound')}{minor}; lifecycle {r.get('lifecycle')}"


def _wiped(r: dict[str, Any]) -> str:
    request = r.get("deletion_request")
    if request:
        return f"wiped; deletion request {request} queued until the cloud acknowledges it"
    return "wiped; no deletion request (the device was not bound)"


def _consent(r: dict[str, Any]) -> str:
    if "withdrawn" in r:
        return (
            f"{r['withdrawn']} withdrawn; "
            f"{_n(r.get('pending_items_deleted', 0), 'queued item')} of it deleted"
        )
    text = f"{r.get('granted')} granted" if r.get("changed") else f"{r.get('granted')} was granted"
    if r.get("in_force"):
        return f"{text}; in force"
    return f"{text}; not in force: {r.get('not_in_force_because')}"


def _location(r: dict[str, Any]) -> str:
    if "precision" in r:
        return f"location precision set to {r['precision']}"
    stored = r.get("stored")
    if not stored:
        return f"location not stored: {r.get('why')}"
    return (
        f"location stored at {stored.get('precision')} precision: "
        f"{stored.get('lat')}, {stored.get('lon')}"
    )


def _export(r: dict[str, Any]) -> str:
    if "exported" in r:
        return (
            f"{_n(r.get('entries'), 'ledger entry', 'ledger entries')} written to {r['exported']}"
        )
    entries = r.get("entries") or []
    lines = [
        f"{_n(len(entries), 'ledger entry', 'ledger entries')} (--json or -o FILE for every field)"
    ]
    for e in entries:
        when = e.get("at") or ""  # RFC 3339 already, as the ledger export gives it
        words = [e.get("type"), e.get("action"), e.get("purpose"), e.get("kind"), e.get("msg_id")]
        lines.append(f"  {when}  " + " ".join(str(w) for w in words if w))
    return "\n".join(lines)


_VERBS: dict[str, Callable[[dict[str, Any]], str]] = {
    "bind": _bind,
    "unbind": _wiped,
    "factory-reset": _wiped,
    "account-cancelled": _wiped,
    "consent": _consent,
    "location": _location,
    "export": _export,
    "crash": lambda r: f"crash diagnostics queued as {r.get('queued')}",
}


def render(verb: str, result: dict[str, Any], *, sock: str, state_dir: str) -> str:
    """The text for ``verb``'s ``result``."""
    if verb == "status":
        return status(result, sock=sock, state_dir=state_dir)
    return _VERBS[verb](result)
