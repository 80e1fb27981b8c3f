"""Crash diagnostics are minimal by structure (P12): type and frames, no crash text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import crashes
from agent.core.crashes import EXTERNAL, Frame, frames_of, module_of
from agent.core.purposes import Purpose, parse_envelope
from agent.device import CrashReport
from agent.runtime.collectors import parse_crash_file
from tests.device.helpers import Rig, granted_rig
from tests.hostile_crashes import SECRETS, TEXTS, leaked

D = Purpose.DIAGNOSTICS


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return granted_rig(tmp_path, D)


def _sent(rig: Rig, report: CrashReport) -> bytes:
    assert rig.core is not None
    rig.core.capture_crash(report, now=rig.tick())
    (item,) = [o for o in rig.deliver_all() if o.purpose is D]
    return item.payload


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_no_hostile_text_leaves_the_device(rig: Rig, name: str) -> None:
    signature, stack, uptime = parse_crash_file(TEXTS[name].encode())
    payload = _sent(rig, CrashReport(signature, stack, uptime_s=uptime))
    assert leaked(payload) == []
    parse_envelope(payload)  # and it is a valid crash message


def test_the_corpus_would_leak_without_the_structure() -> None:
    # The corpus is hostile: every secret is in it, and the raw texts carry them all.
    everything = "\n".join(TEXTS.values()).encode()
    assert leaked(everything) == list(SECRETS)


def test_a_python_traceback_keeps_types_and_frames_of_the_software(rig: Rig) -> None:
    signature, stack, _ = parse_crash_file(TEXTS["python traceback"].encode())
    data = json.loads(_sent(rig, CrashReport(signature, stack)))["data"]
    assert data["exception"] == "ValueError"
    assert data["frames"] == [
        {"module": EXTERNAL, "function": "<module>", "line": 12},
        {"module": EXTERNAL, "function": "connect", "line": 3},
        {"module": EXTERNAL, "function": "<redacted>", "line": 9},
        {"module": "miio.fan", "function": "<redacted>", "line": 42},
        {"module": EXTERNAL, "function": "<redacted>", "line": 43},
        {"module": "miio.fan", "function": "spin", "line": 44},
    ]
    assert data["signature"] == "ValueError in miio.fan.spin"
    assert sorted(data) == [
        "default_gateway",
        "exception",
        "firmware_version",
        "frames",
        "ip_addresses",
        "routes",
        "signature",
        "uptime_s",
    ]


def test_a_gdb_backtrace_keeps_the_signal_and_functions() -> None:
    got = crashes.minimal("SIGSEGV in parse_ssid", TEXTS["gdb backtrace"])
    assert got["exception"] == "SIGSEGV"
    assert got["frames"] == [
        {"module": EXTERNAL, "function": "main", "line": 12},
        {"module": EXTERNAL, "function": "<redacted>", "line": 3},
        {"module": EXTERNAL, "function": "parse_ssid", "line": 88},
    ]


@pytest.mark.parametrize(
    ("path", "module"),
    [
        ("/usr/lib/python3/dist-packages/miio/fan.py", "miio.fan"),
        ("/opt/smartmi/venv/lib/python3.11/site-packages/agent/cli.py", "agent.cli"),
        ("/usr/lib/python3.11/asyncio/tasks.py", "asyncio.tasks"),
        ("agent/runtime/__init__.py", "agent.runtime"),
        ("/home/alice/x.py", EXTERNAL),
        ("/media/usb0/creds.py", EXTERNAL),
        ("../../etc/passwd", EXTERNAL),
        ("C:\\Users\\alice\\x.py", EXTERNAL),
        ("<frozen importlib._bootstrap>", EXTERNAL),
        ("/usr/lib/python3/dist-packages/my-pkg/x.py", EXTERNAL),
    ],
)
def test_only_paths_inside_the_software_become_module_names(path: str, module: str) -> None:
    assert module_of(path) == module


TB = "Traceback (most recent call last):\n"


@pytest.mark.parametrize(
    ("signature", "stack", "exception"),
    [
        # A traceback cut short after its header or a frame: the signature's type stays.
        ("SIGSEGV in sim #3", TB + '  File "/home/sim/app.py"', "SIGSEGV"),
        ("SIGABRT", TB, "SIGABRT"),
        ("12 bad things", TB + '  File "/home/sim/app.py"', "unknown"),
        # Free text where the exception line belongs is not a type (P12: it is dropped).
        ("SIGBUS", TB + "call failed for alice", "SIGBUS"),
        # A real exception line, with or without its message.
        ("x", TB + "ValueError: bad thing", "ValueError"),
        ("x", TB + "KeyboardInterrupt", "KeyboardInterrupt"),
    ],
)
def test_the_exception_type_never_comes_from_the_tracebacks_text(
    signature: str, stack: str, exception: str
) -> None:
    doc = crashes.minimal(signature, stack)
    assert doc["exception"] == exception
    assert doc["signature"] == exception  # no frames of the software: the type alone


def test_at_most_the_innermost_frames_are_kept() -> None:
    stack = "".join(f'  File "app/m{i}.py", line {i}, in f{i}\n' for i in range(100))
    frames = frames_of(stack)
    assert len(frames) == crashes.MAX_FRAMES
    assert frames[-1] == Frame("app.m99", "f99", 99)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*|<[a-z]+>|unknown")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.text(max_size=400))
def test_whatever_the_text_only_names_and_numbers_remain(signature: str, stack: str) -> None:
    got = crashes.minimal(signature, stack, secrets=("SN-1",))
    assert set(got) == {"exception", "frames", "signature"}
    assert _NAME.fullmatch(got["exception"])
    for frame in got["frames"]:
        assert _NAME.fullmatch(frame["module"])
        assert _NAME.fullmatch(frame["function"])
        assert isinstance(frame["line"], int)
    words = got["signature"].split(" in ")
    assert all(_NAME.fullmatch(w) for w in words)
