"""Cloud commands (``down/{command}``): strict schemas, size limit, replay and staleness.

Every command is a JSON object of at most 4 KiB with a ``command_id`` and an
``issued_at`` (strict RFC 3339 in UTC); unknown fields are rejected (P12 applies to
input as well). A command is taken at most once: its ``command_id`` is remembered
(``Memory``, durable) for the staleness window. Staleness and future skew guard
only the commands that widen collection; a narrowing command is never refused for
its age (SPEC §3, see ``agent.core.ordering``). Commands that act for an owner
(consent, precision, unbind, account cancellation) name the ``binding_id`` they
are for, so a command replayed after the device changed owner can never act on the
new owner's data.

Pure: ``parse`` validates, ``Memory`` remembers, ``check_fresh`` guards widening
commands; ``agent.core.cloud.take`` decides what a command does. Each raises
``CommandRejected`` with a short reason code, never anything else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from agent.core.purposes import Purpose, parse_rfc3339
from agent.errors import CommandRejected

MAX_BYTES: Final = 4096
STALE_AFTER_S: Final = 7 * 24 * 3600.0  # a device may be offline for days; older is stale
FUTURE_SKEW_S: Final = 300.0  # issued more than this ahead of the device clock: refused
MAX_REMEMBERED: Final = 20_000  # commands remembered at once (see Memory)

_Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
_Text = Annotated[str, StringConstraints(min_length=1, max_length=128)]


def _rfc3339(value: str) -> str:
    parse_rfc3339(value)  # strict RFC 3339 in UTC, or a SchemaError (a ValueError)
    return value


_Time = Annotated[_Text, AfterValidator(_rfc3339)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    command_id: _Id
    issued_at: _Time

    @property
    def issued(self) -> float:
        """``issued_at`` in seconds since the epoch."""
        return parse_rfc3339(self.issued_at)


class OwnerCommand(_Command):
    """A command that acts for an owner names the binding it is for."""

    binding_id: Annotated[str, StringConstraints(pattern=r"^[!-~]{1,128}$")]


class ConsentCommand(OwnerCommand):
    """Set purposes: ``true`` grants under ``policy_version``, ``false`` withdraws."""

    purposes: dict[Purpose, bool] = Field(min_length=1)
    policy_version: _Text


class PrecisionCommand(OwnerCommand):
    """Change the location precision (P3)."""

    precision: Literal["off", "country", "region", "city"]


class UnbindCommand(OwnerCommand):
    """The owner deleted the device in the app (P9, P10)."""


class AccountCancelledCommand(OwnerCommand):
    """The owner's account was cancelled (P9, P10)."""


class SuspendCommand(_Command):
    """The service stops: no personal-data collection until resumed (P13)."""


class ResumeCommand(_Command):
    """The service resumes."""


Command = (
    ConsentCommand
    | PrecisionCommand
    | UnbindCommand
    | AccountCancelledCommand
    | SuspendCommand
    | ResumeCommand
)

SCHEMAS: Final[dict[str, type[Command]]] = {
    "consent": ConsentCommand,
    "location-precision": PrecisionCommand,
    "unbind": UnbindCommand,
    "account-cancelled": AccountCancelledCommand,
    "suspend-collection": SuspendCommand,
    "resume-collection": ResumeCommand,
}


def _where(exc: ValidationError) -> str:
    """Field names and error types only: the values may be hostile or personal."""
    return ", ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['type']}" for e in exc.errors()[:5]
    )


def parse(name: str, payload: bytes) -> Command:
    """Validate a command's name, size, JSON and schema; raise CommandRejected."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise CommandRejected("unknown-command", f"no command named {name[:64]!r}")
    if len(payload) > MAX_BYTES:
        raise CommandRejected("too-large", f"{len(payload)} bytes, the limit is {MAX_BYTES}")
    try:
        raw: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CommandRejected("not-json", type(exc).__name__) from None
    if not isinstance(raw, dict):
        raise CommandRejected("not-an-object", type(raw).__name__)
    command_id = raw.get("command_id") if isinstance(raw.get("command_id"), str) else None
    try:
        return schema.model_validate_json(payload)
    except ValidationError as exc:
        raise CommandRejected("schema", _where(exc), command_id=(command_id or "")[:64]) from None


class SyncAnswer(BaseModel):
    """The cloud's answer to a command sync (``down/sync``, SPEC §3 commands first).

    The cloud publishes it after every command it issued to the device before the
    sync request, so the broker delivers it behind them; ``now`` is the cloud's
    clock, which the device compares its own with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    sync_id: _Id
    now: _Time


def parse_sync(payload: bytes) -> SyncAnswer:
    """Validate a sync answer; raise CommandRejected."""
    if len(payload) > MAX_BYTES:
        raise CommandRejected("too-large", f"{len(payload)} bytes, the limit is {MAX_BYTES}")
    try:
        return SyncAnswer.model_validate_json(payload)
    except ValidationError as exc:
        raise CommandRejected("schema", _where(exc)) from None


@dataclass(frozen=True, slots=True)
class Memory:
    """The commands a device has taken (applied or ignored), by ``command_id``.

    Durable (sealed in the control record, which survives wipes) and bounded by
    time: a command is remembered for the staleness window after it was issued, and
    a widening command older than that window is refused as stale, so a replay is
    refused whether it is remembered or not. A narrowing command older than the
    window may be forgotten: its replay can only narrow again, and the setting's
    stamp refuses it if a later change was made. When the memory is full, widening
    commands are refused until entries age out (fail closed), never evicted.
    """

    seen: Mapping[str, float] = field(default_factory=dict)  # command_id -> issued_at

    def knows(self, command_id: str) -> bool:
        """Whether this command was taken before."""
        return command_id in self.seen

    @property
    def full(self) -> bool:
        """No room for another command."""
        return len(self.seen) >= MAX_REMEMBERED

    def remember(self, command_id: str, issued_at: float, now: float) -> Memory:
        """This memory with ``command_id`` added and entries past the window dropped."""
        horizon = now - STALE_AFTER_S
        kept = {k: t for k, t in self.seen.items() if t >= horizon}
        kept[command_id] = issued_at
        return Memory(kept)


def check_fresh(command: Command, issued_at: float, now: float) -> None:
    """A widening command must be recent and not from the future (``now`` on the cloud's
    clock where the device knows its offset); raise CommandRejected otherwise."""
    if issued_at < now - STALE_AFTER_S:
        raise CommandRejected(
            "stale", f"issued {now - issued_at:.0f} s ago", command_id=command.command_id
        )
    if issued_at > now + FUTURE_SKEW_S:
        raise CommandRejected(
            "from-the-future",
            f"issued {issued_at - now:.0f} s ahead of the device clock",
            command_id=command.command_id,
        )
