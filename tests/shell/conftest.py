"""What the shell's tests share: a valid agent configuration over a device identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.pki import DevPki
from tests.device.helpers import install_identity

GOOD = """
[device]
id = "cli-1"
serial = "SN1"
model = "smartmi.fan.za5"
firmware_version = "1.0"

[privacy]
policy_version = "7"

[paths]
state_dir = "state"

[broker]
url = "mqtts://127.0.0.1:8883"
ca = "pki/ca.pem"
cert = "pki/dev.pem"
key = "pki/dev.key"
"""


@pytest.fixture
def conf(tmp_path: Path, pki: DevPki) -> Path:
    """An agent.toml that loads, with device cli-1's certificate and key beside it."""
    install_identity(pki, tmp_path / "pki", "cli-1")
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    return path
