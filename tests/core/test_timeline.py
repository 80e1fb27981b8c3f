"""Timeline and capture files: what an observer saw going down is kept apart from the
uplink, and the delivery times of commands survive a timeline file and a shard merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.core.identity import down_topic, up_topic
from agent.core.purposes import Purpose
from agent.errors import ConfigError
from simulator import timeline
from simulator.cloud import Received
from simulator.truth import DeviceTruth
from simulator.workers import read_shards


def line(at: float, topic: str, doc: object) -> str:
    """One capture line as ``mosquitto_sub -F '%U %t %x'`` prints it."""
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return f"{at:.6f} {topic} {payload.hex()}\n"


CRASH = {"schema": "smartmi.crash/1", "msg_id": "m1", "device_id": "d1"}
CAPTURE = "".join(
    [
        line(10.0, up_topic("d1", "crash"), CRASH),
        line(11.0, down_topic("d1", "consent"), {"command_id": "c1", "issued_at": "x"}),
        line(11.5, down_topic("d1", "sync"), {"sync_id": "s1", "now": "x"}),  # not a command
        line(12.0, down_topic("d1", "consent"), {"command_id": "c1"}),  # a replay: later
        line(12.5, down_topic("d2", "suspend-collection"), {"command_id": "c2"}),
        line(13.0, down_topic("d2", "consent"), b"\xff not json"),  # hostile: skipped
        line(13.5, down_topic("d2", "consent"), ["command_id", "c3"]),
        line(14.0, up_topic("d2", "sync"), {"sync_id": "s2"}),
    ]
)


def test_down_lines_are_deliveries_not_data(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text(CAPTURE)
    capture = timeline.read_capture(path)
    assert [(r.device_id, r.kind, r.arrived_at) for r in capture.received] == [
        ("d1", "crash", 10.0),
        ("d2", "sync", 14.0),
    ]
    assert capture.delivered == {"d1": {"c1": 11.0}, "d2": {"c2": 12.5}}


def test_what_a_backend_received_keeps_the_brokers_stored_time(tmp_path: Path) -> None:
    """A shard's received file carries each message's stored time (from JetStream) to
    the checker that judges all shards: without it, departure falls back to arrival."""
    path = tmp_path / "received.txt"
    payload = json.dumps(CRASH).encode()
    timeline.write_capture(
        path,
        [Received("d1", "crash", payload, 20.0, 10.25), Received("d2", "crash", payload, 21.0)],
    )
    got = timeline.read_capture(path).received
    assert [(r.device_id, r.arrived_at, r.stored_at) for r in got] == [
        ("d1", 20.0, 10.25),
        ("d2", 21.0, None),
    ]


def test_a_line_on_another_topic_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text(CAPTURE + line(15.0, "smartmi/v1/d1/sideways/x", {}))
    with pytest.raises(ConfigError, match=r"line 9 .* not a device's up/ or down/ topic"):
        timeline.read_capture(path)


def test_deliveries_go_into_the_truths_earliest_first(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text(CAPTURE)
    truths = {"d1": DeviceTruth("d1", "g", "1"), "d2": DeviceTruth("d2", "g", "1")}
    truths["d1"].delivered["c1"] = 10.5  # an earlier sighting, from another capture
    truths["d2"].delivered["c2"] = 20.0
    timeline.read_capture(path).note_in(truths)
    assert truths["d1"].delivered == {"c1": 10.5}
    assert truths["d2"].delivered == {"c2": 12.5}


def test_a_timeline_file_and_a_shard_merge_keep_the_delivery_times(tmp_path: Path) -> None:
    truths: dict[str, DeviceTruth] = {}
    for n in (1, 2):
        t = DeviceTruth(f"d{n}", "g", "1", grace_s=2.5)
        t.log(5.0, "withdraw", purpose="diagnostics", via="cloud", command_id=f"c{n}")
        t.queued(f"m{n}", Purpose.DIAGNOSTICS, 4.0)
        t.delivered[f"c{n}"] = 6.25
        t.sent[f"c{n}"] = 5.5
        truths[t.device_id] = t
        timeline.write(tmp_path / f"t{n}.json", {t.device_id: t}, [])
    back, _outages = timeline.read(tmp_path / "t1.json")
    assert back["d1"].delivered == {"c1": 6.25}
    assert back["d1"].sent == {"c1": 5.5}  # when the cloud's send began
    assert back["d1"].events == [
        (5.0, "withdraw", {"purpose": "diagnostics", "via": "cloud", "command_id": "c1"})
    ]
    capture = tmp_path / "c.txt"
    capture.write_text(line(6.0, down_topic("d2", "consent"), {"command_id": "c2"}))
    merged, _outages, received = read_shards(
        [tmp_path / "t1.json", tmp_path / "t2.json"], [capture]
    )
    assert {d: t.delivered for d, t in merged.items()} == {"d1": {"c1": 6.25}, "d2": {"c2": 6.0}}
    assert {d: t.sent for d, t in merged.items()} == {"d1": {"c1": 5.5}, "d2": {"c2": 5.5}}
    assert received == []
