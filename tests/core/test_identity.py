"""Device ID validation: nothing that MQTT could read as a wildcard or path gets through."""

from __future__ import annotations

import pytest

from agent.core.identity import BACKEND_ID, down_filter, up_topic, validate_device_id
from agent.errors import InvalidDeviceId


@pytest.mark.parametrize(
    "device_id",
    ["dev-0001", "A", "smartmi.fan.za5:00ff", "x" * 64, "0_0"],
)
def test_valid_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@pytest.mark.parametrize(
    ("device_id", "reason"),
    [
        ("", "empty"),
        ("x" * 65, "65 characters"),
        ("dev+1", "wildcard"),
        ("dev#", "wildcard"),
        ("a/b", "wildcard or path"),
        ("$SYS", "wildcard"),
        ("dev 1", "wildcard"),
        ("dev\t1", "wildcard"),
        ("-lead", "starting with a letter"),
        ("d\u00e9v", "letters, digits"),
        ("dev\x00", "letters, digits"),
        (BACKEND_ID, "reserved"),
    ],
)
def test_invalid_ids_name_the_problem(device_id: str, reason: str) -> None:
    with pytest.raises(InvalidDeviceId) as info:
        validate_device_id(device_id)
    assert reason in str(info.value)
    assert info.value.device_id == device_id


def test_topics() -> None:
    assert up_topic("d1", "crash") == "smartmi/v1/d1/up/crash"
    assert down_filter("d1") == "smartmi/v1/d1/down/+"
    with pytest.raises(ValueError, match="unknown up kind"):
        up_topic("d1", "telemetry")
