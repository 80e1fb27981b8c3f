"""Device identity: IDs, the MQTT topics they own, and the backend's reserved name.

The device ID is the common name of the device's certificate, and the broker's ACL
substitutes it into topic patterns (``%u``), so it must never contain anything that
MQTT treats as structure: ``+`` and ``#`` are wildcards, ``/`` is a level separator,
``$`` starts the broker's own topics (MQTT v5 §4.7, §4.7.2).
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from agent.errors import InvalidDeviceId, SchemaError

MAX_DEVICE_ID_LENGTH: Final = 64
# The backend's certificate CN. The ACL grants it read on every device's up/ and
# write on every down/, so no device may ever be issued this name.
BACKEND_ID: Final = "smartmi-backend"
# More backend consumers, one per fleet shard or cloud worker: smartmi-backend-1 to
# -16, with the backend's rights (broker-config/acl lists each).
MAX_BACKENDS: Final = 16
_BACKEND_N = re.compile(r"smartmi-backend-([1-9]|1[0-6])")


def backend_id(n: int) -> str:
    """The CN of backend consumer ``n`` (1 to MAX_BACKENDS); 0 is the backend itself."""
    if not 0 <= n <= MAX_BACKENDS:
        raise SchemaError(f"backend consumer {n}: use 0 to {MAX_BACKENDS}")
    return BACKEND_ID if n == 0 else f"{BACKEND_ID}-{n}"


# An observer's certificate CN: the ACL lets it read every device's up/ and nothing
# else, so an independent capture can be judged beside the backend (SPEC §4).
OBSERVER_ID: Final = "smartmi-observer"
TOPIC_ROOT: Final = "smartmi/v1"
# "sync" is the command sync of SPEC §3 (commands first): not personal, no consent.
UP_KINDS: Final = ("activation", "crash", "deletion-request", "sync")

_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe as a certificate CN and MQTT topic level."""
    if not device_id:
        raise InvalidDeviceId(device_id, "it is empty")
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise InvalidDeviceId(
            device_id, f"it has {len(device_id)} characters, at most {MAX_DEVICE_ID_LENGTH}"
        )
    bad = sorted({c for c in device_id if c in "+#/$" or c.isspace()})
    if bad:
        raise InvalidDeviceId(device_id, f"it contains {''.join(bad)!r} (MQTT wildcard or path)")
    if not _ALLOWED.fullmatch(device_id):
        raise InvalidDeviceId(
            device_id,
            "use letters, digits and . _ : - only, starting with a letter or digit",
        )
    if device_id in (BACKEND_ID, OBSERVER_ID) or _BACKEND_N.fullmatch(device_id):
        raise InvalidDeviceId(device_id, "it is a reserved name (backend or observer)")
    return device_id


MAX_BINDING_ID: Final = 128
# A binding ID names an owner's binding in the cloud: visible ASCII only, so it can be
# stored, logged and sent back in a deletion request whatever else happens (P9, P10).
BINDING_ID = re.compile(r"[!-~]{1,128}", re.ASCII)


def validate_binding_id(binding_id: str) -> str:
    """Return ``binding_id`` if it is 1 to 128 visible ASCII characters; else SchemaError."""
    if not BINDING_ID.fullmatch(binding_id):
        raise SchemaError(
            f"binding ID must be 1 to {MAX_BINDING_ID} visible ASCII characters "
            "(letters, digits, punctuation; no spaces or control characters)"
        )
    return binding_id


def safe_binding_id(binding_id: str) -> str:
    """A stored binding ID as a deletion request can carry it: itself if valid, else a
    digest of its bytes, so no stored value can block a wipe or its request (P9, P10)."""
    if BINDING_ID.fullmatch(binding_id):
        return binding_id
    raw = binding_id.encode("utf-8", "surrogateescape")
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def up_topic(device_id: str, kind: str) -> str:
    """The device -> cloud topic for one message kind."""
    if kind not in UP_KINDS:
        raise ValueError(f"unknown up kind {kind!r}")
    return f"{TOPIC_ROOT}/{device_id}/up/{kind}"


def down_topic(device_id: str, command: str) -> str:
    """The cloud -> device topic for one command."""
    return f"{TOPIC_ROOT}/{device_id}/down/{command}"


def down_filter(device_id: str) -> str:
    """The subscription filter a device uses for its own commands."""
    return f"{TOPIC_ROOT}/{device_id}/down/+"


UP_FILTER_ALL: Final = f"{TOPIC_ROOT}/+/up/+"


def up_filter(device_id: str) -> str:
    """The subscription filter of one device's uplink (a backend consumer of a shard)."""
    return f"{TOPIC_ROOT}/{device_id}/up/+"
