"""Purposes, their payload schemas and the message envelope (P1, P7, P12; SPEC §3).

Every outgoing message belongs to exactly one purpose; each purpose fixes the
fields it may carry (a strict pydantic model: unknown fields are rejected), its
retention period and the up/ topic kind. ``deletion-request`` is the one message
that is not a purpose: it is sent without consent (P10).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.core.choices import parse_choice
from agent.errors import SchemaError


class Purpose(enum.StrEnum):
    """A purpose the user can consent to (P1)."""

    ACTIVATION = "activation"
    DIAGNOSTICS = "diagnostics"


def parse_purpose(value: str) -> Purpose:
    """A Purpose from user input, with an error listing the valid ones."""
    return parse_choice(Purpose, value, "purpose")


@dataclass(frozen=True, slots=True)
class PurposePolicy:
    """What one purpose may carry and for how long it may wait unsent (P7)."""

    purpose: Purpose
    kind: str  # the up/ topic kind and the envelope schema name
    retention_s: float


DAY: Final = 86_400.0
POLICIES: Final = {
    Purpose.ACTIVATION: PurposePolicy(Purpose.ACTIVATION, "activation", 30 * DAY),
    Purpose.DIAGNOSTICS: PurposePolicy(Purpose.DIAGNOSTICS, "crash", 14 * DAY),
}
DELETION_KIND: Final = "deletion-request"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Location(_Strict):
    """A coarsened location; ``precision`` says how coarse (P3)."""

    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    precision: Literal["country", "region", "city"]


class ActivationData(_Strict):
    """Activation payload (SPEC §1)."""

    serial: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=64)
    firmware_version: str = Field(min_length=1, max_length=64)
    trigger: Literal["first-activation", "firmware-update", "restore"]
    location: Location | None


class Route(_Strict):
    """One routing-table entry."""

    destination: str = Field(max_length=64)
    gateway: str | None = Field(max_length=64)
    interface: str = Field(max_length=32)


_NAME: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,15}$"


class Frame(_Strict):
    """One stack frame: names and a line number, never a path or a value (P12)."""

    module: str = Field(pattern=rf"{_NAME}|^<external>$|^<redacted>$", max_length=1100)
    function: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$|^<[a-z]{1,12}>$")
    line: int = Field(ge=0, le=999_999_999)


class CrashData(_Strict):
    """Crash diagnostics payload (SPEC §1, P12): minimal by structure, no crash text."""

    ip_addresses: list[str] = Field(max_length=32)
    default_gateway: str | None = Field(max_length=64)
    routes: list[Route] = Field(max_length=64)
    exception: str = Field(pattern=rf"{_NAME}|^unknown$|^<redacted>$", max_length=1100)
    frames: list[Frame] = Field(max_length=64)
    signature: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.<> ]+$")
    firmware_version: str = Field(min_length=1, max_length=64)
    uptime_s: float = Field(ge=0)


class DeletionRequestData(_Strict):
    """The request to delete cloud-held data after a wipe (P10).

    ``binding_id`` is null and ``reason`` is ``unknown`` only in a stand-in: a request
    the device knows it owes (its counters say so) but whose sealed copies no key can
    open any more; it asks the cloud to delete what it holds of the device."""

    binding_id: str | None = Field(min_length=1, max_length=128)
    reason: Literal["unbind", "factory-reset", "account-cancelled", "unknown"]
    requested_at: str


class ConsentReceipt(_Strict):
    """The grant a message was sent under, so the cloud can verify it (SPEC §3)."""

    purpose: Purpose
    policy_version: str
    granted_at: str


class Envelope(_Strict):
    """The JSON envelope of every up/ message."""

    schema_: str = Field(alias="schema")
    msg_id: str = Field(min_length=1, max_length=64)
    device_id: str
    captured_at: str
    consent: ConsentReceipt | None = None
    data: dict[str, Any]


_DATA_MODELS: Final[dict[str, type[_Strict]]] = {
    "activation": ActivationData,
    "crash": CrashData,
    DELETION_KIND: DeletionRequestData,
}


def rfc3339(ts: float) -> str:
    """UTC RFC 3339 with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    text = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


# RFC 3339 §5.6 date-time in UTC: full date, "T", full time, optional fraction, and
# "Z" or "+00:00". Python's fromisoformat alone also takes ISO 8601 forms that RFC 3339
# does not (basic format, week dates, a space for "T").
_RFC3339_UTC = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|\+00:00)", re.ASCII
)


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch for a strict RFC 3339 UTC time; SchemaError otherwise."""
    if not _RFC3339_UTC.fullmatch(text):
        raise SchemaError(f"not an RFC 3339 UTC time: {text[:40]!r}")
    whole, _, frac = text.removesuffix("Z").removesuffix("+00:00").partition(".")
    try:
        value = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC)
    except ValueError as exc:
        raise SchemaError(f"not an RFC 3339 UTC time: {text[:40]!r}") from exc
    return value.timestamp() + (float(f"0.{frac}") if frac else 0.0)


def validate_data(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """Check a payload against its kind's strict schema; return it normalised (P12)."""
    model = _DATA_MODELS.get(kind)
    if model is None:
        raise SchemaError(f"unknown message kind {kind!r}")
    try:
        return model.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        raise SchemaError(_first_error(exc), schema=f"smartmi.{kind}/1") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"{where}: {err['msg']}"


def build_envelope(
    *,
    kind: str,
    msg_id: str,
    device_id: str,
    captured_at: float,
    data: dict[str, Any],
    receipt: ConsentReceipt | None,
) -> bytes:
    """Validate ``data`` against ``kind`` and serialise the envelope (UTF-8 JSON)."""
    if (receipt is None) != (kind == DELETION_KIND):
        raise SchemaError("a consent receipt is required on every message but deletion-request")
    body = {
        "schema": f"smartmi.{kind}/1",
        "msg_id": msg_id,
        "device_id": device_id,
        "captured_at": rfc3339(captured_at),
        "consent": receipt.model_dump(mode="json") if receipt else None,
        "data": validate_data(kind, data),
    }
    if receipt is None:
        del body["consent"]
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def parse_envelope(payload: bytes) -> Envelope:
    """Parse and validate an envelope, including its data against its schema."""
    try:
        env = Envelope.model_validate_json(payload)
    except ValidationError as exc:
        raise SchemaError(_first_error(exc), schema="envelope") from exc
    kind = env.schema_.removeprefix("smartmi.").removesuffix("/1")
    validate_data(kind, env.data)
    return env


def payload_digest(payload: bytes) -> str:
    """SHA-256 of a payload as hex, for the ledger (P11)."""
    return hashlib.sha256(payload).hexdigest()
