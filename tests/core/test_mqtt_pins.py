"""The MQTT adapter leans on internals of aiomqtt and paho-mqtt: it runs on exactly the
versions it was read from, pinned in pyproject.toml, and on no other."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from agent.runtime.mqtt import READ_FROM

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def test_the_installed_mqtt_libraries_are_the_ones_the_adapter_was_read_from() -> None:
    installed = {name: importlib.metadata.version(name) for name in READ_FROM}
    assert installed == READ_FROM


def test_pyproject_pins_exactly_those_versions() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in dependencies if "==" in d}
    assert {name: pins.get(name) for name in READ_FROM} == READ_FROM
