"""``smartmi-sim run --html FILE``: the run's report as one page to look at.

One self-contained HTML file: the charts are SVG drawn by matplotlib and written into
the page, the style sheet is inline, and there is no script, font or image fetched
when it is viewed. It shows the summary, connected devices and messages over time
with broker restarts and violations marked, the latency distribution, every
violation (up to a cap) with its details, and, for the first devices with one, that
device's story on one time axis (``simulator.story``).
"""

from __future__ import annotations

import datetime as dt
import html
import io
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.errors import ConfigError
from simulator import report
from simulator.story import ARRIVED, CAPTURED, DELIVERED, ISSUED, LANES, LEFT, USER, Story

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from simulator.cloud import Received

MAX_VIOLATION_ROWS: Final = 500
KIND_COLOURS: Final = {
    "activation": "#1f77b4",
    "crash": "#ff7f0e",
    "deletion-request": "#2ca02c",
}
VIOLATION_COLOUR: Final = "#d62728"


def available() -> None:
    """ConfigError, before a run starts, if the plotting library is missing."""
    try:
        import matplotlib  # noqa: F401  # only the check
    except ImportError:
        raise ConfigError(
            "--html needs matplotlib: pip install 'smartmi-agent[report]'", where="--html"
        ) from None


def write(
    doc: dict[str, Any],
    received: Sequence[Received],
    latencies: Sequence[float],
    path: Path,
    stories: Sequence[Story] = (),
) -> None:
    """Write the page for the report ``doc``, what the backend ``received``, the
    judged messages' ``latencies`` (seconds) and the violating devices' ``stories``."""
    path.write_text(page(doc, received, latencies, stories), encoding="utf-8")


def page(
    doc: dict[str, Any],
    received: Sequence[Received],
    latencies: Sequence[float],
    stories: Sequence[Story] = (),
) -> str:
    """The whole page as a string."""
    import matplotlib  # a heavy import, only for --html

    matplotlib.use("Agg")  # no display: render to files only
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "smartmi", "font.size": 9})
    series = doc.get("series") or {}
    # The page counts its seconds from the run's start, else from the first arrival.
    start = _started(doc) or min((r.arrived_at for r in received), default=0.0)
    arrived: dict[str, float] = {}
    for r in received:
        msg_id = r.envelope().get("msg_id")
        if isinstance(msg_id, str):
            arrived.setdefault(msg_id, r.arrived_at)
    end = max(
        [start + float(doc.get("elapsed_s") or 0.0)]
        + [r.arrived_at for r in received]
        + [s[0] for s in series.get("samples") or []]
    )
    # A violation is placed where its message arrived; one without a message (a
    # missing deletion request, a lost item) at the end of the run.
    marks = [
        (arrived.get(v.get("msg_id") or "", end) - start, v) for v in doc.get("violations", [])
    ]
    charts = [
        ("Devices connected and items acknowledged", _timeline_chart(doc, start, marks)),
        ("Messages received by the backend, per second", _messages_chart(received, start, doc)),
        ("Latency, capture to backend", _latency_chart(latencies, doc)),
    ]
    if marks:
        charts.append(("Violations on the timeline", _violations_chart(marks, end - start)))
    body = [_summary(doc)]
    body += [f"<section><h2>{html.escape(t)}</h2>{svg}</section>" for t, svg in charts]
    anchors = {story.device_id: f"story-{n}" for n, story in enumerate(stories)}
    body.append(_violation_table(marks, anchors))
    body += [_story(story, anchors[story.device_id], start) for story in stories]
    title = f"smartmi-sim: {doc.get('scenario')} — {doc.get('verdict', '?').upper()}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )


_STYLE: Final = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.25em .7em;text-align:left;
border-bottom:1px solid #ddd;vertical-align:top}th{background:#f4f4f4}
.pass{color:#fff;background:#2ca02c;padding:.1em .5em;border-radius:.3em}
.fail{color:#fff;background:#d62728;padding:.1em .5em;border-radius:.3em}
.incomplete,.no-verdict{color:#000;background:#ffd34d;padding:.1em .5em;border-radius:.3em}
svg{max-width:100%;height:auto}code{font-size:.95em}
tr.flagged td{background:#fde8e8}.story ul{padding-left:1.2em}
"""


def _summary(doc: dict[str, Any]) -> str:
    verdict = str(doc.get("verdict", "?"))
    c, m, d = doc.get("connect", {}), doc.get("memory", {}), doc.get("delivery", {})
    lat = doc.get("latency_s", {})
    shards = doc.get("shards", 1)
    badges = f'<span class="{html.escape(verdict)}">{html.escape(verdict.upper())}</span>'
    if not doc.get("complete", True):
        badges += ' <span class="incomplete">INCOMPLETE: interrupted</span>'
    counts = ", ".join(f"{k} {v}" for k, v in doc.get("violation_counts", {}).items() if v)
    rows = [
        ("scenario", f"{doc.get('scenario')} (seed {doc.get('seed')})"),
        ("devices", f"{doc.get('devices')}" + (f" in {shards} shards" if shards > 1 else "")),
        (
            "run",
            f"{doc.get('elapsed_s')} s on {doc.get('machine')}"
            + (f", from {stamp(started)}" if (started := _started(doc)) else ""),
        ),
        ("connected", report.connected(c)),
        (
            "delivered",
            f"{d.get('unique')} unique, {d.get('duplicates')} duplicates; "
            + ", ".join(f"{k} {v}" for k, v in sorted((d.get("by_kind") or {}).items())),
        ),
        (
            "acknowledged",
            f"{d.get('acknowledged')} of {d.get('published')} published; "
            f"{d.get('broker_custody')} lost in the broker's custody; "
            f"drained: {d.get('drained')}",
        ),
        ("latency", ", ".join(f"{k} {v} s" for k, v in lat.items()) or "none"),
        ("memory", f"{m.get('per_device_kib')} KiB per device"),
        ("violations", f"{len(doc.get('violations', []))}" + (f": {counts}" if counts else "")),
    ]
    if (capture := doc.get("capture")) is not None:
        seen = capture.get("violations", [])
        rows.append(
            (
                "observer",
                f"{capture.get('unique')} unique seen at the broker by the observer: "
                f"{len(seen)} violations, "
                + ("agrees with the backend" if capture.get("agrees") else "DISAGREES"),
            )
        )
    if (events := doc.get("events")) is not None:
        refused = events.get("refused") or {}
        rows.append(
            (
                "events",
                f"{events.get('applied')} applied; refused by the device (as designed): "
                + (", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "none"),
            )
        )
    if d.get("from_earlier_runs"):
        rows.append(("earlier runs", f"{d['from_earlier_runs']} messages counted apart"))
    if timing := doc.get("schedule"):
        rows.append(
            (
                "schedule",
                timing["late"]
                or f"events at most {timing['max_lag_s']} s late (bound {timing['bound_s']:g} s)",
            )
        )
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return (
        f"<h1>smartmi-sim run: {html.escape(str(doc.get('scenario')))} {badges}</h1>"
        f"<table>{table}</table>"
    )


def _started(doc: dict[str, Any]) -> float:
    value = (doc.get("series") or {}).get("started_at")
    return float(value) if isinstance(value, int | float) else 0.0


def _figure(height: float = 3.0) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height), layout="constrained")
    return fig, fig.subplots()


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]  # the XML declaration and DOCTYPE are not for HTML


def _restarts(ax: Axes, doc: dict[str, Any], start: float) -> None:
    for n, t in enumerate((doc.get("series") or {}).get("broker_restarts") or []):
        ax.axvline(
            t - start, color="#888", linestyle="--", lw=1, label="broker restart" if not n else None
        )


def _timeline_chart(
    doc: dict[str, Any], start: float, marks: list[tuple[float, dict[str, Any]]]
) -> str:
    samples = (doc.get("series") or {}).get("samples") or []
    fig, ax = _figure()
    if samples:
        t = [s[0] - start for s in samples]
        ax.plot(t, [s[1] for s in samples], color="#1f77b4", label="devices connected")
        ax.set_ylabel("devices")
        acked = ax.twinx()
        acked.plot(t, [s[3] for s in samples], color="#9467bd", label="items acknowledged")
        acked.set_ylabel("items acknowledged")
        acked.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no samples in this report", ha="center", transform=ax.transAxes)
    _restarts(ax, doc, start)
    if marks:
        ax.plot(
            [at for at, _ in marks],
            [0] * len(marks),
            "|",
            color=VIOLATION_COLOUR,
            markersize=14,
            label="violation",
        )
    ax.set_xlabel("seconds since the run started")
    ax.legend(loc="upper left")
    return _svg(fig)


def _messages_chart(received: Sequence[Received], start: float, doc: dict[str, Any]) -> str:
    fig, ax = _figure()
    per_kind: dict[str, Counter[int]] = {}
    for r in received:
        per_kind.setdefault(r.kind, Counter())[int(r.arrived_at - start)] += 1
    if per_kind:
        last = max(max(c) for c in per_kind.values())
        seconds = list(range(last + 1))
        for kind, counts in sorted(per_kind.items()):
            ax.plot(
                seconds,
                [counts.get(s, 0) for s in seconds],
                label=kind,
                color=KIND_COLOURS.get(kind),
                lw=1.2,
            )
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "nothing was received", ha="center", transform=ax.transAxes)
    _restarts(ax, doc, start)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("messages / s")
    return _svg(fig)


def _latency_chart(latencies: Sequence[float], doc: dict[str, Any]) -> str:
    fig, ax = _figure()
    values = [max(v, 1e-4) for v in latencies]
    if values:
        lo, hi = min(values), max(values)
        edges = _log_edges(lo, hi)
        ax.hist(values, bins=edges, color="#1f77b4")
        ax.set_xscale("log")
        for key, style in (("p50", "-"), ("p99", "--")):
            value = (doc.get("latency_s") or {}).get(key)
            if isinstance(value, int | float) and value > 0:
                ax.axvline(value, color="#d62728", linestyle=style, lw=1, label=f"{key} {value} s")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no latencies", ha="center", transform=ax.transAxes)
    ax.set_xlabel("seconds from capture to the backend (log scale)")
    ax.set_ylabel("messages")
    return _svg(fig)


def _log_edges(lo: float, hi: float, bins: int = 40) -> list[float]:
    if hi <= lo:
        return [lo * 0.9, hi * 1.1]
    ratio = (hi / lo) ** (1 / bins)
    return [lo * ratio**i for i in range(bins + 1)]


def _violations_chart(marks: list[tuple[float, dict[str, Any]]], span: float) -> str:
    kinds = sorted({v["kind"] for _, v in marks})
    fig, ax = _figure(1.2 + 0.35 * len(kinds))
    row = {k: i for i, k in enumerate(kinds)}
    ax.scatter(
        [at for at, _ in marks],
        [row[v["kind"]] for _, v in marks],
        marker="x",
        color=VIOLATION_COLOUR,
    )
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlim(0, max(span, 1.0) * 1.03)  # a violation at the very end stays visible
    ax.set_xlabel("seconds since the run started (a violation without a message: at the end)")
    return _svg(fig)


def _violation_table(marks: Iterable[tuple[float, dict[str, Any]]], anchors: dict[str, str]) -> str:
    rows = sorted(marks, key=lambda m: m[0])
    if not rows:
        return "<section><h2>Violations</h2><p>None: every promise held.</p></section>"

    def device(name: str) -> str:
        code = f"<code>{html.escape(name)}</code>"
        return f'<a href="#{anchors[name]}">{code}</a>' if name in anchors else code

    cells = "".join(
        f"<tr><td>{at:.1f}</td><td>{html.escape(v['kind'])}</td>"
        f"<td>{device(v['device'])}</td>"
        f"<td><code>{html.escape(str(v.get('msg_id') or ''))}</code></td>"
        f"<td>{html.escape(v['detail'])}</td></tr>"
        for at, v in rows[:MAX_VIOLATION_ROWS]
    )
    more = (
        f"<p>{len(rows) - MAX_VIOLATION_ROWS} more in the JSON report.</p>"
        if len(rows) > MAX_VIOLATION_ROWS
        else ""
    )
    return (
        f"<section><h2>Violations ({len(rows)})</h2><table><tr><th>s</th><th>rule</th>"
        f"<th>device</th><th>msg_id</th><th>detail</th></tr>{cells}</table>{more}</section>"
    )


_LANE_MARKERS: Final = {
    USER: "^",
    ISSUED: "s",
    DELIVERED: "D",
    CAPTURED: "o",
    LEFT: ">",
    ARRIVED: "o",
}


def _story(story: Story, anchor: str, start: float) -> str:
    """A violating device's story: its chart, then its choices and the messages a
    violation names, in time order (the other messages are on the chart); seconds
    count from ``start``."""
    flagged = story.flagged
    told = [m for m in story.moments if m.msg_id is None or m.msg_id in flagged]
    rows = "".join(
        ('<tr class="flagged">' if m.msg_id in flagged else "<tr>") + f"<td>{m.at - start:.2f}</td>"
        f"<td>{html.escape(m.lane)}</td><td>{html.escape(m.what)}</td>"
        f"<td><code>{html.escape(m.msg_id or '')}</code></td></tr>"
        for m in told
    )
    others = len({m.msg_id for m in story.moments if m.msg_id and m.msg_id not in flagged})
    why = "".join(
        f"<li><b>{html.escape(v['kind'])}</b> {html.escape(v['detail'])}"
        + (f" <code>{html.escape(v['msg_id'])}</code>" if v.get("msg_id") else "")
        + "</li>"
        for v in story.violations
    )
    return (
        f'<section id="{anchor}" class="story"><h2>Device <code>'
        f"{html.escape(story.device_id)}</code>: its story</h2><ul>{why}</ul>"
        f"{_story_chart(story, start)}<table><tr><th>s</th><th>lane</th><th>what</th>"
        f"<th>msg_id</th></tr>{rows}</table>"
        f"<p>{others} other messages of this device are on the chart only.</p></section>"
    )


def _story_chart(story: Story, start: float) -> str:
    fig, ax = _figure(2.6)
    at = {m: m.at - start for m in story.moments}  # seconds since the run started
    y = {lane: len(LANES) - 1 - i for i, lane in enumerate(LANES)}
    paths: dict[str, list[tuple[float, float]]] = {}
    for m in story.moments:
        if m.msg_id is not None:
            paths.setdefault(m.msg_id, []).append((at[m], y[m.lane]))
    for msg_id, points in paths.items():
        bad = msg_id in story.flagged
        ax.plot(
            *zip(*sorted(points), strict=True),
            color=VIOLATION_COLOUR if bad else "#bbb",
            lw=2.2 if bad else 0.6,
            zorder=3 if bad else 1,
        )
    span = max((at[m] for m in story.moments), default=1.0) - min(
        (at[m] for m in story.moments), default=0.0
    )
    labelled: dict[str, tuple[float, int]] = {}  # lane: the last label's time and step
    for m in story.moments:
        colour = KIND_COLOURS.get(m.kind or "", "#444")
        ax.plot(at[m], y[m.lane], _LANE_MARKERS[m.lane], color=colour, markersize=5, zorder=2)
        if m.lane in (USER, ISSUED):
            # Choices close together are stepped up, so that their labels do not overlap.
            last, step = labelled.get(m.lane, (-math.inf, 0))
            step = step + 1 if at[m] - last < max(span, 1.0) * 0.05 else 0
            labelled[m.lane] = (at[m], step)
            ax.annotate(
                m.what,
                (at[m], y[m.lane]),
                xytext=(2, 5 + 8 * step),
                textcoords="offset points",
                fontsize=7,
                rotation=20,
            )
    for m in story.moments:
        if m.lane == LEFT and m.msg_id in story.flagged:
            ax.plot(at[m], y[m.lane], "x", color=VIOLATION_COLOUR, markersize=11, mew=2, zorder=4)
    ax.set_yticks([y[lane] for lane in LANES], LANES)
    ax.set_ylim(-0.5, len(LANES) - 0.2)
    ax.grid(axis="x", color="#eee")
    ax.set_xlabel("seconds since the run started (red: the message a violation names)")
    return _svg(fig)


def stamp(at: float) -> str:
    """A wall-clock time as the page shows it (UTC)."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
