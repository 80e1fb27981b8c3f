"""Run the benchmark suite: ``python -m bench [--quick] [--json FILE]``.

Every figure that depends on speed is printed next to a ceiling or baseline measured
in the same run, and each target from the performance issue is marked met or not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any, Final

from bench import core, fleet, positive_int, progress

DOCS: Final = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
MARK_START: Final = "<!-- bench: the latest full run's table, written by python -m bench -->"
MARK_END: Final = "<!-- bench: end of the table -->"


def _row(name: str, figure: str, ceiling: str, target: str, *, met: bool | None) -> dict[str, Any]:
    mark = "-" if met is None else ("met" if met else "NOT met")
    print(f"{name:<42} {figure:<46} {ceiling:<34} {target:<30} {mark}", flush=True)
    return {"name": name, "figure": figure, "ceiling": ceiling, "target": target, "met": met}


def _cluster_row(cl: dict[str, Any]) -> dict[str, Any]:
    """The fleet on a 3-node NATS cluster, against the 50,000-agent target."""
    name = f"NATS cluster (3 nodes), --workers {cl['workers']}"
    if "error" in cl:
        return _row(name, cl["error"][:46], "-", "50,000 up, 0 violations", met=False)
    counts = ", ".join(f"{k} {v}" for k, v in cl["violation_counts"].items()) or "none"
    ended = "" if cl["complete"] else ", stopped at its time limit"
    return _row(
        f"{name}, {cl['devices']:,} (smoke)",
        (
            f"all up in {cl['connect_s']} s"
            if cl["connected"] == cl["devices"] and cl["connect_s"] is not None
            else f"{cl['connected']:,} of {cl['devices']:,} up"
        )
        + f", wall {cl['wall_s']:.0f} s{ended}; "
        f"fleet {cl['fleet_mib']:.0f} MiB, brokers' peak {cl['broker_peak_mib']:.0f} MiB; "
        f"{cl['violations']} violations ({counts})",
        "-",
        "50,000 up, acknowledged, 0 violations",
        met=cl["devices"] >= 50_000
        and cl["connected"] == cl["devices"]
        and cl["violations"] == 0
        and cl["complete"]
        and cl["drained"],
    )


def _arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--json", default="bench/results/latest.json", help="where to write JSON")
    parser.add_argument("--devices", type=positive_int, default=10_000, help="fleet start size")
    parser.add_argument("--throughput-devices", type=positive_int, default=1000)
    parser.add_argument("--throughput-seconds", type=float, default=20.0)
    parser.add_argument(
        "--ceiling-seconds", type=float, default=5.0, help="each run of a throughput ceiling"
    )
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument(
        "--workers-devices",
        type=positive_int,
        default=3000,
        help="fleet size of the smartmi-sim runs with --workers 1 and one per core",
    )
    parser.add_argument(
        "--cluster-devices",
        type=int,
        default=None,
        help="fleet size on the 3-node NATS cluster, 0 for none (1,000 by default, none "
        "with --quick; the target is 50,000; on a 2-core machine the cluster fails well "
        "below it, see docs/brokers.md; a worker per 15,000)",
    )
    parser.add_argument(
        "--cluster-limit",
        type=positive_int,
        default=1800,
        help="seconds before the cluster run is stopped and what arrived is judged",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 devices everywhere, 10 s throughput, 3 s per ceiling run, 10 s idle, "
        "withdrawal up to 10,000 pending, smartmi-sim run only with a worker per core, "
        "no cluster",
    )
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"write the table into {DOCS.name} between its markers (by default after a "
        "full run, not after --quick)",
    )
    args = parser.parse_args()
    if args.quick:
        args.devices = args.workers_devices = 1000
        args.throughput_seconds, args.idle_seconds, args.ceiling_seconds = 10.0, 10.0, 3.0
    if args.cluster_devices is None:
        args.cluster_devices = 0 if args.quick else 1000
    if args.docs is None:
        args.docs = not args.quick
    return args


def _core_rows(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Capture-to-queue and withdrawal, on the device core alone."""
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for sync in ("FULL", "NORMAL"):  # the device and the fleet settings
        progress.step(f"capture-to-queue, synchronous={sync}")
        r = core.capture_to_queue(sync)
        raw[f"capture_{sync}"] = r
        rows.append(
            _row(
                f"capture-to-queue ({sync})",
                f"p50 {r['p50_us']:.0f} us",
                f"bare insert {r['baseline_p50_us']:.0f} us",
                "-",
                met=None,
            )
        )
    # Runs per size: the set-up captures every pending item through the agent, so
    # 100,000 pending take half a minute a run.
    reps = {1_000: 10, 10_000: 5, 100_000: 2}
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000)
    ws = {}
    for n in sizes:
        progress.step(f"withdrawal, {n:,} pending, {reps[n]} runs")
        ws[n] = core.withdrawal_p99(n, reps=reps[n])
    raw["withdrawal"] = ws[10_000]
    raw["withdrawal_by_pending"] = ws
    for n, w in ws.items():
        rows.append(
            _row(
                f"withdrawal, {n:,} pending (FULL)",
                f"p99 {w['p99_ms']:.1f} ms ({reps[n]} runs)",
                f"bare delete of the rows {w['baseline_ms']:.1f} ms",
                "p99 <= 10 ms",
                met=w["p99_ms"] <= 10,
            )
        )
    low, high = ws[sizes[0]]["p99_ms"], ws[sizes[-1]]["p99_ms"]
    rows.append(
        _row(
            f"withdrawal flat, {sizes[0]:,} -> {sizes[-1]:,} pending",
            f"p99 {low:.1f} -> {high:.1f} ms = {high / low:.2f}x",
            "-",
            "<= 2x (flat)",
            met=high <= 2 * low,
        )
    )
    return rows, raw


def _fleet_rows(f: dict[str, Any]) -> list[dict[str, Any]]:
    """Fleet start, memory, throughput, the storm and the daemon, each by its ceiling."""
    rows: list[dict[str, Any]] = []
    st, fl, tp, dm, bare = (
        f["s_time_per_s"],
        f["fleet"],
        f["throughput"],
        f["daemon"],
        f["bare_daemon"],
    )
    ratio = fl["devices_per_s"] / st
    # The ceiling used before: per user-CPU second, summed (see s_time_ceiling).
    per_user = fl["devices_per_s"] / f["s_time_per_user_s"]
    rows.append(
        _row(
            f"fleet start, {fl['devices']:,} agents, one process",
            f"{fl['devices_per_s']:,.0f}/s in {fl['start_s']:.1f} s = {ratio:.2f}x",
            f"s_time {st:,.0f}/s (per user-CPU s {f['s_time_per_user_s']:,.0f}/s: {per_user:.2f}x)",
            ">= 0.6x s_time (goal 0.8x)",
            met=ratio >= 0.6,
        )
    )
    for sh in f["sharded"]:
        if "error" in sh:
            rows.append(
                _row(
                    f"fleet start, --workers {sh['workers']}", sh["error"][:46], "-", "-", met=False
                )
            )
            continue
        r = sh["devices_per_s"] / st
        rows.append(
            _row(
                f"smartmi-sim run --workers {sh['workers']}, {sh['devices']:,} (smoke)",
                f"{sh['connected']:,} up, {sh['devices_per_s']:,.0f}/s = {r:.2f}x, "
                f"{sh['per_device_kib']:.0f} KiB/dev, {sh['violations']} violations",
                f"s_time {st:,.0f}/s",
                ">= 0.3x s_time, 0 violations",
                met=r >= 0.3 and sh["violations"] == 0 and sh["connected"] == sh["devices"],
            )
        )
    cl = f.get("cluster")
    if cl is not None:
        rows.append(_cluster_row(cl))
    kib = fl["rss_per_device_kib"]
    rows.append(
        _row(
            f"memory per device at {fl['devices']:,}",
            f"{kib:.1f} KiB",
            f"TLS connection, own context {f['tls_floor_kib']:.1f} KiB",
            "<= 64 KiB (goal 40)",
            met=kib <= 64,
        )
    )
    same, paho = tp["same_work_msgs_per_s"], tp["paho_msgs_per_s"]
    same_cpu = min(r["cpu_us_per_msg"] for r in tp["same_work_runs"])
    rows.append(
        _row(
            f"throughput, {tp['devices']:,} agents, {tp['seconds']:.0f} s",
            f"{tp['msgs_per_s']:,.0f} msg/s = {tp['msgs_per_s'] / same:.2f}x same work "
            f"({tp['msgs_per_s'] / paho:.2f}x bare paho); CPU {tp['cpu_us_per_msg']:.0f} us/msg",
            f"same work {same:,.0f}/s (CPU {same_cpu:.0f} us/msg), bare paho {paho:,.0f}/s; "
            f"{tp['window']} in flight",
            ">= 0.5x same work",
            met=tp["msgs_per_s"] >= 0.5 * same,
        )
    )
    back = fl["storm_all_back_s"]
    rows.append(
        _row(
            f"reconnect storm, {fl['devices']:,} agents",
            f"{'not all back' if back is None else f'all back in {back:.1f} s'}, "
            f"peak {fl['storm_max_attempts_per_s']} attempts/s, {fl['storm_pending_lost']} lost",
            f"s_time: all in {fl['devices'] / st:.1f} s",
            "<= 60 s, nothing lost",
            met=back is not None and back <= 60 and fl["storm_pending_lost"] == 0,
        )
    )
    rows.append(
        _row(
            "agent daemon",
            f"{dm['rss_mb']:.1f} MB, {dm['start_to_connected_s']:.2f} s to connected, "
            f"{dm['idle_cpu_pct']:.2f} % idle CPU",
            f"bare paho process {bare['rss_mb']:.1f} MB, {bare['start_to_connected_s']:.2f} s",
            "<= 35 MB, <= 0.5 s, <= 0.5 %",
            met=dm["rss_mb"] <= 35
            and dm["start_to_connected_s"] <= 0.5
            and dm["idle_cpu_pct"] <= 0.5,
        )
    )
    return rows


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table as docs/benchmarks.md shows it, with when and where it was measured."""
    lines = [
        f"Run {meta['date'][:16].replace('T', ' ')} UTC ({meta['wall_s'] / 60:.1f} min, "
        f"`{meta['command']}`), "
        f"{meta['machine']}, Python {meta['python']}; the raw figures are in "
        "`bench/results/latest.json`.",
        "",
        "| benchmark | figure | same-run ceiling | target | |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "" if r["met"] is None else ("met" if r["met"] else "**not met**")
        cells = (r["name"], r["figure"], r["ceiling"], r["target"], mark)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_docs(table: str, doc: Path = DOCS) -> None:
    """Put ``table`` between the two markers of ``doc``, in place of what was there."""
    text = doc.read_text()
    head, start, rest = text.partition(MARK_START)
    _old, end, tail = rest.partition(MARK_END)
    if not start or not end:
        raise SystemExit(f"{doc} lacks the markers {MARK_START} and {MARK_END}")
    doc.write_text(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")


def main() -> int:
    """Run every benchmark, print a table, write JSON (and the docs' table)."""
    args = _arguments()
    # Thousands of devices log each reconnect; the table is the output here.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for name in ("smartmi.transport", "smartmi.mqtt"):  # paho's lines on a broker restart
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started = dt.datetime.now(dt.UTC)
    print(
        f"{'benchmark':<42} {'figure':<46} {'same-run ceiling':<34} {'target':<30} result",
        flush=True,
    )
    rows, raw = _core_rows(args.quick)
    f = fleet.run_all(
        args.devices,
        args.throughput_devices,
        args.throughput_seconds,
        args.idle_seconds,
        ceiling_s=args.ceiling_seconds,
        workers_devices=args.workers_devices,
        one_workers_run=args.quick,
        cluster_devices=args.cluster_devices,
        cluster_limit_s=args.cluster_limit,
    )
    raw["fleet"] = f
    rows += _fleet_rows(f)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "wall_s": progress.elapsed(),
        "command": "python -m bench" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "args": vars(args),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "raw": raw}, indent=2))
    print(f"wrote {out}")
    if args.docs:
        write_docs(_markdown(rows, meta))
        print(f"wrote the table into {DOCS}")
    print(f"took {progress.elapsed() / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
