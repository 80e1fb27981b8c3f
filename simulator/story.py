"""One device's story on one time axis, for a violation's reader.

What its user chose and when; what the cloud issued for it and when the broker
delivered it; what the device captured; when each message left the device (by the
checker's own evidence: the observer's capture at the broker, else the PUBACK, else
the backend's arrival) and when it reached the backend. Times are on the real clock
(a device's skewed stamps are put back on it); the page counts them from the run's
start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent.core.purposes import DELETION_KIND, POLICIES, parse_rfc3339
from simulator.checker import departure
from simulator.cloud import Received
from simulator.truth import DeviceTruth

# The lanes, top to bottom, as the page draws them.
USER: Final = "user chose"
ISSUED: Final = "cloud issued"
DELIVERED: Final = "delivered to device"
CAPTURED: Final = "captured"
LEFT: Final = "left the device"
ARRIVED: Final = "reached the backend"
LANES: Final = (USER, ISSUED, DELIVERED, CAPTURED, LEFT, ARRIVED)

MAX_STORIES: Final = 12  # devices told in full on the page; the rest are in the table


@dataclass(frozen=True, slots=True)
class Moment:
    """One thing that happened to the device."""

    at: float  # on the real clock
    lane: str
    what: str
    msg_id: str | None = None  # the message it concerns, if any
    kind: str | None = None  # that message's kind


@dataclass(frozen=True, slots=True)
class Story:
    """A device's moments in time order, and the messages a violation names."""

    device_id: str
    moments: tuple[Moment, ...]
    violations: tuple[dict[str, Any], ...]

    @property
    def flagged(self) -> frozenset[str]:
        """The msg_ids the violations name."""
        return frozenset(v["msg_id"] for v in self.violations if v.get("msg_id"))


def _choice(what: str, info: dict[str, Any]) -> str:
    detail = {
        "grant": info.get("purpose"),
        "withdraw": info.get("purpose"),
        "precision": info.get("level"),
        "wipe": info.get("reason"),
        "bind": "as a minor" if info.get("minor") else None,
        "policy-version": info.get("version"),
        "clock": f"{float(info.get('offset_s', 0)):+.1f} s" if "offset_s" in info else None,
    }.get(what)
    return what if detail is None else f"{what} {detail}"


def tell(
    truth: DeviceTruth,
    received: Iterable[Received],
    violations: Sequence[dict[str, Any]],
) -> Story:
    """``truth``'s story, with what the backend ``received`` from the device."""
    moments: list[Moment] = []
    for t, what, info in truth.events:
        label = _choice(what, info)
        command_id = info.get("command_id")
        if info.get("via") != "cloud":
            moments.append(Moment(t, USER, label))
            continue
        moments.append(Moment(t, ISSUED, label))
        if isinstance(command_id, str) and command_id in truth.delivered:
            moments.append(Moment(truth.delivered[command_id], DELIVERED, label))
    for msg_id, (purpose, at) in truth.queued_items.items():
        kind = POLICIES[purpose].kind
        moments.append(Moment(truth.real_time(at), CAPTURED, kind, msg_id, kind))
    arrived: set[str] = set()
    for r in received:
        sent = r.msg_id
        if sent is None or sent in arrived or r.kind == "sync":
            continue
        arrived.add(sent)
        left, evidence = departure(truth, r)
        moments.append(Moment(left, LEFT, f"{r.kind} ({evidence})", sent, r.kind))
        moments.append(Moment(r.arrived_at, ARRIVED, r.kind, sent, r.kind))
        captured = r.envelope().get("captured_at")
        if r.kind == DELETION_KIND and isinstance(captured, str):
            at = truth.real_time(parse_rfc3339(captured))
            moments.append(Moment(at, CAPTURED, r.kind, sent, r.kind))
    moments.sort(key=lambda m: (m.at, LANES.index(m.lane)))
    return Story(truth.device_id, tuple(moments), tuple(violations))


def stories(
    truths: dict[str, DeviceTruth],
    received: Iterable[Received],
    violations: Sequence[dict[str, Any]],
    *,
    limit: int = MAX_STORIES,
) -> list[Story]:
    """The stories of the first ``limit`` devices with a violation, in the order of
    their first violation in the report."""
    named: dict[str, list[dict[str, Any]]] = {}
    for v in violations:
        if v["device"] in truths and (v["device"] in named or len(named) < limit):
            named.setdefault(v["device"], []).append(v)
    by_device: dict[str, list[Received]] = {d: [] for d in named}
    for r in received:
        if r.device_id in by_device:
            by_device[r.device_id].append(r)
    return [tell(truths[d], by_device[d], vs) for d, vs in named.items()]
