"""The run's report: JSON for machines, a summary for people, JUnit XML for CI systems."""

from __future__ import annotations

import bisect
import json
import platform
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Final

from simulator.checker import Verdict, percentiles
from simulator.cloud import SEND_WITHIN_S
from simulator.fleet import Fleet
from simulator.schedule import MAX_LAG_S, late

# A run that fell behind its schedule (see simulator.schedule.MAX_LAG_S) has no verdict.
NO_VERDICT = "no-verdict"
RULES = (
    "no-consent",
    "minor",
    "location",
    "after-wipe",
    "deletion-request",
    "lost",
    "malformed",
    "spoofed",
)


def judged(verdict: Verdict, grace: dict[str, float]) -> dict[str, Any]:
    """The checker's part of a report: violations, counts and the grace it allowed."""
    counts = Counter(v.kind for v in verdict.violations)
    return {
        # The only grace: a message already on the wire when the user made a choice
        # may arrive this long after it (per group: its path's latency).
        "grace_s": grace,
        "received": verdict.received,
        "unique": verdict.unique,
        "duplicates": verdict.duplicates,
        "by_kind": dict(verdict.by_kind),
        "broker_custody": verdict.broker_custody,
        "from_earlier_runs": verdict.earlier,
        "latency_s": percentiles(verdict.latencies_s),
        "violation_counts": {k: counts.get(k, 0) for k in RULES},
        "violations": [v.to_json() for v in verdict.violations],
        "verdict": "pass" if not verdict.violations else "fail",
    }


def schedule(lags_s: list[float], latest: str) -> dict[str, Any]:
    """How late the fleet carried out its scheduled events, and whether that leaves it
    a verdict (``late``: why not, or None)."""
    worst = max(lags_s, default=0.0)
    return {
        "events": len(lags_s),
        "lag_s": percentiles(lags_s),
        "max_lag_s": round(worst, 3),
        "latest": latest,
        "bound_s": MAX_LAG_S,
        "late": late(worst, latest),
    }


def _merged_schedule(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest shard's schedule: a fleet is as late as its latest part."""
    parts = [d.get("schedule") or schedule([], "") for d in shards]
    return max(parts, key=lambda part: float(part["max_lag_s"]))


UNDRAINED: Final = (
    "the fleet did not drain within the scenario's settle_s: what still waits was neither "
    "delivered nor lost, so the run proved nothing about it"
)


def undrained(doc: dict[str, Any]) -> str | None:
    """Why a run that kept its schedule still gives no verdict: it did not drain and found
    no violation (a violation is one, drained or not); None otherwise."""
    drained = (doc.get("delivery") or {}).get("drained", True)
    if drained or not doc.get("complete", True) or doc.get("violations"):
        return None
    return UNDRAINED


def unsent(doc: dict[str, Any]) -> str | None:
    """Why a run whose cloud could not send every command gives no verdict; None if it
    sent them all."""
    n = int((doc.get("events") or {}).get("commands_unsent", 0))
    if not n:
        return None
    return (
        f"{n} cloud command(s) never reached the broker (out of reach for "
        f"{SEND_WITHIN_S:g} s while the cloud kept sending): the devices could not hear "
        "every choice the scenario made"
    )


def no_verdict(doc: dict[str, Any]) -> str | None:
    """Why the run gives no verdict (it fell behind its schedule, its cloud could not
    send every command, or it did not drain); None when it gives one."""
    return (doc.get("schedule") or {}).get("late") or unsent(doc) or undrained(doc)


def verdict_summary(doc: dict[str, Any]) -> list[str]:
    """The lines that say what the checker found (and that it is no verdict, when the
    fleet did not keep its schedule or did not drain)."""
    n = len(doc["violations"])
    why = no_verdict(doc)
    head = [f"  NO VERDICT  {why}"] if why else []
    if not n:
        return [*head, "  violations  none"]
    counts = ", ".join(f"{k} {v}" for k, v in doc["violation_counts"].items() if v)
    return [*head, f"  VIOLATIONS  {n}: {counts}"] + [
        f"    {v['kind']:<16} {v['device']} {v['msg_id']}: {v['detail']}"
        for v in doc["violations"][:10]
    ]


def build(fleet: Fleet, verdict: Verdict) -> dict[str, Any]:
    """The report document."""
    s = fleet.stats
    n = len(fleet.devices)
    transports = [d.transport.stats for d in fleet.devices.values()]
    per_device = (s.rss_fleet_kib - s.rss_baseline_kib) / n if n else 0.0
    grace = {d.group.name: d.truth.grace_s for d in fleet.devices.values()}
    judgement = judged(verdict, grace)
    timing = schedule(s.event_lags_s, s.latest)
    doc: dict[str, Any] = {
        "scenario": fleet.scenario.name,
        "seed": fleet.seed,
        # Stopped early (Ctrl-C): what arrived was judged; nothing counts as lost.
        "complete": not fleet.was_interrupted,
        "devices": n,
        "groups": dict(Counter(d.group.name for d in fleet.devices.values())),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "elapsed_s": round(s.elapsed_s, 2),
        "connect": {
            "connected": s.connected,
            "seconds": None if s.connect_s is None else round(s.connect_s, 2),
            "devices_per_s": round(n / s.connect_s, 1) if s.connect_s else None,
            "reconnects": sum(max(0, t.connects - 1) for t in transports),
            "stuck_stops": s.stuck_stops,
        },
        "memory": {
            "rss_baseline_kib": s.rss_baseline_kib,
            "rss_fleet_kib": s.rss_fleet_kib,
            "per_device_kib": round(per_device, 1),
            "broker_peak_kib": s.broker_peak_kib,
        },
        "events": {
            "applied": s.events_applied,
            "refused": dict(s.events_refused),
            "commands_unsent": s.commands_unsent,
        },
        "delivery": {
            "received": verdict.received,
            "unique": verdict.unique,
            "duplicates": verdict.duplicates,
            "by_kind": dict(verdict.by_kind),
            "published": sum(t.published for t in transports),
            "acknowledged": sum(t.acknowledged for t in transports),
            "refused": sum(t.refused for t in transports),
            "aborted": sum(t.aborted for t in transports),
            "broker_custody": verdict.broker_custody,
            "from_earlier_runs": verdict.earlier,
            "broker_restarts": len(s.broker_restarts),
            "drained": s.drained,
        },
        "latency_s": judgement["latency_s"],
        "series": {
            "started_at": s.started_at,
            "samples": s.samples,
            "broker_restarts": s.broker_restarts,
        },
        "command_delivery_s": percentiles(s.command_delays_s),
        "schedule": timing,
        "grace_s": grace,
        "violation_counts": judgement["violation_counts"],
        "violations": judgement["violations"],
    }
    doc["verdict"] = NO_VERDICT if no_verdict(doc) else judgement["verdict"]
    return doc


def merged(
    shards: list[dict[str, Any]], verdict: Verdict, *, broker_peak_kib: int = 0
) -> dict[str, Any]:
    """One report from the reports of a fleet's shards and the checker's verdict over
    all of them (their timelines and what their backend consumers received), with the
    peak memory of the broker they shared when it was ours (0: not known)."""
    n = sum(d["devices"] for d in shards)
    seconds = [d["connect"]["seconds"] for d in shards]
    # None: a shard was stopped before all its devices had connected.
    connect_s = None if None in seconds else max(seconds)
    base = sum(d["memory"]["rss_baseline_kib"] for d in shards)
    fleet = sum(d["memory"]["rss_fleet_kib"] for d in shards)
    grace: dict[str, float] = {}
    for d in shards:
        grace.update(d["grace_s"])
    judgement = judged(verdict, grace)
    timing = _merged_schedule(shards)

    def total(section: str, key: str) -> int:
        return sum(int(d[section][key]) for d in shards)

    command_delivery: dict[str, float] = {}
    for d in shards:  # the worst shard's figure at each point: an upper bound
        for key, value in d["command_delivery_s"].items():
            command_delivery[key] = max(command_delivery.get(key, 0.0), value)
    doc: dict[str, Any] = {
        "scenario": shards[0]["scenario"],
        "seed": shards[0]["seed"],
        "shards": len(shards),
        "complete": all(d.get("complete", True) for d in shards),
        "devices": n,
        "groups": dict(sum((Counter(d["groups"]) for d in shards), Counter())),
        "machine": shards[0]["machine"],
        "elapsed_s": max(d["elapsed_s"] for d in shards),
        "connect": {
            "connected": total("connect", "connected"),
            "seconds": None if connect_s is None else round(connect_s, 2),
            "devices_per_s": round(n / connect_s, 1) if connect_s else None,
            "reconnects": total("connect", "reconnects"),
            "stuck_stops": total("connect", "stuck_stops"),
        },
        "memory": {
            "rss_baseline_kib": base,
            "rss_fleet_kib": fleet,
            "per_device_kib": round((fleet - base) / n, 1) if n else 0.0,
            "broker_peak_kib": broker_peak_kib,
        },
        "events": {
            "applied": total("events", "applied"),
            "refused": dict(sum((Counter(d["events"]["refused"]) for d in shards), Counter())),
            "commands_unsent": sum(int(d["events"].get("commands_unsent", 0)) for d in shards),
        },
        "delivery": {
            "received": verdict.received,
            "unique": verdict.unique,
            "duplicates": verdict.duplicates,
            "by_kind": dict(verdict.by_kind),
            **{k: total("delivery", k) for k in ("published", "acknowledged", "refused")},
            "aborted": total("delivery", "aborted"),
            "broker_custody": verdict.broker_custody,
            "from_earlier_runs": verdict.earlier,
            "broker_restarts": 0,
            "drained": all(d["delivery"]["drained"] for d in shards),
        },
        "latency_s": judgement["latency_s"],
        "series": merged_series([d.get("series") or {} for d in shards]),
        "command_delivery_s": command_delivery,
        "schedule": timing,
        "grace_s": grace,
        "violation_counts": judgement["violation_counts"],
        "violations": judgement["violations"],
    }
    doc["verdict"] = NO_VERDICT if no_verdict(doc) else judgement["verdict"]
    return doc


def merged_series(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' samples summed on whole seconds (each shard's last sample at or
    before that second counts; before its first, it counts nothing)."""
    runs = [p.get("samples") or [] for p in parts]
    if not any(runs):
        return {"started_at": 0.0, "samples": [], "broker_restarts": []}
    start = min(p["started_at"] for p in parts if p.get("samples"))
    end = max(r[-1][0] for r in runs if r)
    times = [[s[0] for s in samples] for samples in runs]
    out: list[list[float]] = []
    second = int(start)
    while second <= end:
        row = [float(second), 0.0, 0.0, 0.0]
        for samples, at in zip(runs, times, strict=True):
            i = bisect.bisect_right(at, second)
            if i:
                for col in (1, 2, 3):
                    row[col] += samples[i - 1][col]
        out.append(row)
        second += 1
    restarts = sorted(t for p in parts for t in p.get("broker_restarts", []))
    return {"started_at": start, "samples": out, "broker_restarts": restarts}


def connected(c: dict[str, Any]) -> str:
    """How many devices connected, how fast, and how often they reconnected; a run
    stopped before every device connected has no rate (never "None")."""
    rate = (
        f" in {c.get('seconds')} s ({c.get('devices_per_s')} devices/s)"
        if c.get("seconds") is not None and c.get("devices_per_s") is not None
        else " (stopped before every device had connected: no connect rate)"
    )
    return f"{c.get('connected')}{rate}, {c.get('reconnects')} reconnects"


def summary(doc: dict[str, Any]) -> str:
    """A readable summary of the report."""
    c, m, d = doc["connect"], doc["memory"], doc["delivery"]
    lat = doc["latency_s"]
    shards = f" in {doc['shards']} shards" if doc.get("shards", 1) > 1 else ""
    if not doc.get("complete", True):
        shards += " (INCOMPLETE: interrupted; what arrived was judged, nothing counted lost)"
    lines = [
        f"scenario {doc['scenario']} (seed {doc['seed']}): {doc['devices']} devices{shards}, "
        f"{doc['elapsed_s']} s",
        f"  connected   {connected(c)}",
        f"  memory      {m['per_device_kib']} KiB per device above a "
        f"{m['rss_baseline_kib'] // 1024} MiB baseline"
        + (
            f"; the broker's processes peaked at {m['broker_peak_kib'] // 1024} MiB"
            if m.get("broker_peak_kib")
            else ""
        ),
        f"  delivered   {d['unique']} unique ({d['duplicates']} duplicates by msg_id), "
        + ", ".join(f"{k} {v}" for k, v in sorted(d["by_kind"].items())),
        (
            f"  latency     capture to backend p50 {lat['p50']} s, p99 {lat['p99']} s"
            if lat.get("p50") is not None and lat.get("p99") is not None
            else "  latency     none measured: no personal message reached the backend"
        ),
        f"  events      {doc['events']['applied']} applied, "
        f"{sum(doc['events']['refused'].values())} refused by the device (as designed)",
    ]
    if d["broker_custody"]:
        lines.append(f"  broker      {d['broker_custody']} acknowledged items lost by the broker")
    if d.get("from_earlier_runs"):
        lines.append(
            f"  earlier     {d['from_earlier_runs']} messages from an earlier run (the broker "
            "kept them), counted apart: not judged, not in the latency"
        )
    if c.get("stuck_stops"):
        lines.append(f"  warning     {c['stuck_stops']} transports not stopped 10 s after stop()")
    if not d["drained"]:
        lines.append("  warning     the fleet did not drain within settle_s")
    cmd = doc["command_delivery_s"]
    if cmd:
        lines.append(
            f"  commands    issue to device p50 {cmd['p50']} s, p99 {cmd['p99']} s, "
            f"max {cmd['max']} s"
        )
    timing = doc.get("schedule")
    if timing and timing["events"]:
        lines.append(
            f"  schedule    events carried out at most {timing['max_lag_s']} s late "
            f"(p99 {timing['lag_s'].get('p99', timing['max_lag_s'])} s; "
            f"the bound is {timing['bound_s']:g} s)"
        )
    grace = ", ".join(f"{g} {v:g} s" for g, v in sorted(doc["grace_s"].items()))
    lines.append(f"  grace       for items captured before a choice reached the device: {grace}")
    lines.extend(verdict_summary(doc))
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: Path) -> None:
    """Write the JSON report."""
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_junit(doc: dict[str, Any], path: Path) -> None:
    """One test case for the schedule, then one per rule; a rule with violations is a
    failed case listing them."""
    late_by = (doc.get("schedule") or {}).get("late")
    stuck, lost_commands = undrained(doc), unsent(doc)
    suite = ET.Element(
        "testsuite",
        name=f"smartmi-privacy.{doc['scenario']}",
        tests=str(len(RULES) + 3),
        failures=str(
            sum(1 for k in RULES if doc["violation_counts"][k])
            + bool(late_by)
            + bool(lost_commands)
            + bool(stuck)
        ),
        time=str(doc["elapsed_s"]),
    )
    # Whether the run kept its schedule, sent every cloud command and drained: without
    # that, the rules were not tested (a run whose broker died delivered nothing and
    # found no violation).
    for name, why in (("schedule", late_by), ("commands", lost_commands), ("drained", stuck)):
        case = ET.SubElement(suite, "testcase", classname=doc["scenario"], name=name)
        if why:
            ET.SubElement(case, "failure", message="no verdict").text = why
    for rule in RULES:
        case = ET.SubElement(suite, "testcase", classname=doc["scenario"], name=rule)
        found = [v for v in doc["violations"] if v["kind"] == rule]
        if found:
            failure = ET.SubElement(case, "failure", message=f"{len(found)} violations of {rule}")
            failure.text = "\n".join(
                f"{v['device']} {v['msg_id']}: {v['detail']}" for v in found[:200]
            )
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
