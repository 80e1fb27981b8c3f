"""Timeline and capture files: the checker's inputs, written by one tool and read by another.

A **timeline** (JSON) is the ground truth of a run: per device, what the user chose
and when (local actions at the time the user acted, cloud commands at their issue
time, each with its ``command_id``), what the device's outbox queued, acknowledged,
dropped and still held, when an observer saw each command go down (``delivered``), and
when the cloud's send of each that may have reached the broker began (``sent``).
The fleet writes one with ``smartmi-sim run --timeline FILE``; a lab harness can
write one for real devices (``events`` alone are enough to judge consent, precision,
minors and wipes; without ``queued`` no item can be called lost).

A **capture** is what an MQTT client subscribed to ``smartmi/v1/+/up/#`` (and,
optionally, ``smartmi/v1/+/down/#``) received, one message a line, as
``mosquitto_sub -F '%U %t %x'`` prints it: the arrival time (Unix seconds), the topic
and the payload in hex. ``smartmi-sim check`` judges its uplink against a timeline.
Its ``down/`` lines are not data: a command's line (its JSON carries ``command_id``)
says when the broker forwarded that command, the earliest the device can have heard
it; the checker measures the command's path delay from there (``delivered``). Other
``down/`` lines (sync answers, anything that is not a command) are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent.core.purposes import Purpose
from agent.errors import ConfigError
from simulator.cloud import Received
from simulator.truth import DeviceTruth

SCHEMA: Final = "smartmi.timeline/1"


def dump(truths: dict[str, DeviceTruth], outages: list[tuple[float, float]]) -> dict[str, Any]:
    """A run's ground truth as a JSON document."""
    return {
        "schema": SCHEMA,
        "outages": [[s, e if e != float("inf") else None] for s, e in outages],
        "devices": {
            d: {
                "group": t.group,
                "policy_version": t.policy_version,
                "grace_s": t.grace_s,
                "events": [[at, what, info] for at, what, info in t.events],
                "queued": {m: [p.value, at] for m, (p, at) in t.queued_items.items()},
                "acked": t.acked,
                "delivered": t.delivered,
                "sent": t.sent,
                "dropped": sorted(t.dropped_items),
                "pending_at_end": sorted(t.pending_at_end),
                "deletion_requests_pending": t.deletion_requests_pending,
            }
            for d, t in truths.items()
        },
    }


def write(path: Path, truths: dict[str, DeviceTruth], outages: list[tuple[float, float]]) -> None:
    """Write a timeline file."""
    path.write_text(json.dumps(dump(truths, outages)) + "\n", encoding="utf-8")


def read(path: Path) -> tuple[dict[str, DeviceTruth], list[tuple[float, float]]]:
    """The truths and broker outages of a timeline file; ConfigError names what is wrong."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("timeline file not found", where=str(path)) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"not a readable JSON timeline: {exc}", where=str(path)) from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfigError(f"not a {SCHEMA} document", where=str(path))
    truths: dict[str, DeviceTruth] = {}
    try:
        for device_id, d in doc["devices"].items():
            t = DeviceTruth(
                device_id, str(d["group"]), str(d["policy_version"]), grace_s=float(d["grace_s"])
            )
            t.events = [(float(at), str(what), dict(info)) for at, what, info in d["events"]]
            t.queued_items = {
                m: (Purpose(p), float(at)) for m, (p, at) in d.get("queued", {}).items()
            }
            t.acked = {m: float(at) for m, at in d.get("acked", {}).items()}
            t.delivered = {c: float(at) for c, at in d.get("delivered", {}).items()}
            t.sent = {c: float(at) for c, at in d.get("sent", {}).items()}
            t.dropped_items = set(d.get("dropped", []))
            t.pending_at_end = set(d.get("pending_at_end", []))
            t.deletion_requests_pending = int(d.get("deletion_requests_pending", 0))
            truths[device_id] = t
        outages = [
            (float(s), float("inf") if e is None else float(e)) for s, e in doc.get("outages", [])
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"a device entry is malformed: {exc!r}", where=str(path)) from exc
    return truths, outages


@dataclass
class Capture:
    """What an observer at the broker saw: the uplink, and when each command went down."""

    received: list[Received] = field(default_factory=list)
    # device -> command_id -> when the observer first saw the command on its down/
    delivered: dict[str, dict[str, float]] = field(default_factory=dict)

    def add_delivery(self, device_id: str, command_id: str, at: float) -> None:
        """A command seen on ``device_id``'s down/ at ``at``; the earliest sighting counts
        (a replay sends the same command again)."""
        seen = self.delivered.setdefault(device_id, {})
        seen[command_id] = min(at, seen.get(command_id, at))

    def note_in(self, truths: dict[str, DeviceTruth]) -> None:
        """Give each device's truth the delivery times of its commands (the earliest of
        what it already holds and what this capture saw)."""
        for device_id, seen in self.delivered.items():
            truth = truths.get(device_id)
            if truth is None:
                continue
            for command_id, at in seen.items():
                truth.delivered[command_id] = min(at, truth.delivered.get(command_id, at))


def read_capture(path: Path) -> Capture:
    """A ``mosquitto_sub -F '%U %t %x'`` capture; ConfigError on a bad line. A line may
    end in a fourth field: when the broker stored the message (``write_capture``)."""
    out = Capture()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError("capture file not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the capture: {exc}", where=str(path)) from exc
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                _captured(line, out)
            except ValueError as exc:
                raise ConfigError(
                    f"line {n} is not 'TIME TOPIC HEX [STORED]' (mosquitto_sub -F "
                    f"'%U %t %x'): {exc}",
                    where=str(path),
                ) from exc
    return out


def write_capture(path: Path, received: list[Received]) -> None:
    """Write what a backend consumer received as a capture (``read_capture`` reads it)."""
    with path.open("w", encoding="utf-8") as out:
        for r in received:
            stored = "" if r.stored_at is None else f" {r.stored_at:.6f}"
            out.write(
                f"{r.arrived_at:.6f} smartmi/v1/{r.device_id}/up/{r.kind} "
                f"{r.payload.hex()}{stored}\n"
            )


def _captured(line: str, out: Capture) -> None:
    stamp, topic, rest = line.split(" ", 2)
    parts = topic.split("/")
    if len(parts) != 5 or parts[3] not in ("up", "down"):
        raise ValueError(f"not a device's up/ or down/ topic: {topic[:80]!r}")
    hexed, _, stored = rest.strip().partition(" ")
    payload, at = bytes.fromhex(hexed), float(stamp)
    if parts[3] == "up":
        out.received.append(Received(parts[2], parts[4], payload, at, _stamp(stored)))
        return
    try:
        command = json.loads(payload)
    except ValueError:
        return  # not a command the device could take: nothing was delivered
    command_id = command.get("command_id") if isinstance(command, dict) else None
    if isinstance(command_id, str):
        out.add_delivery(parts[2], command_id, at)


def _stamp(text: str) -> float | None:
    """A capture line's optional fourth field: a time, finite and positive."""
    if not text:
        return None
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"stored time {text!r} is not a time")
    return value
