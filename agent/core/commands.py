"""Cloud commands (``down/{command}``): strict schemas, size limit, replay and staleness.

Every command is a JSON object of at most 4 KiB with a ``command_id`` and an
``issued_at``; unknown fields are rejected (P12 applies to input as well). A
command is applied at most once: its ``command_id`` is remembered for the
staleness window, and anything issued earlier than that window is refused as
stale. Commands that act for an owner (consent, precision, unbind, account
cancellation) name the ``binding_id`` they are for, so a command replayed after
the device changed owner can never act on the new owner's data.

Pure: ``parse`` validates and ``ReplayGuard`` remembers; ``agent.runtime.commands``
carries an admitted command out on the device. Each raises ``CommandRejected``
with a short reason code, never anything else.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from agent.core.purposes import Purpose, parse_rfc3339
from agent.errors import AgentError, CommandRejected

MAX_BYTES: Final = 4096
STALE_AFTER_S: Final = 7 * 24 * 3600.0  # a device may be offline for days; older is stale
FUTURE_SKEW_S: Final = 300.0  # issued more than this ahead of the device clock: refused

_Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
_Text = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    command_id: _Id
    issued_at: _Text


class OwnerCommand(_Command):
    """A command that acts for an owner names the binding it is for."""

    binding_id: _Text


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
        # Field names and error types only: the values may be hostile or personal.
        where = ", ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['type']}"
            for e in exc.errors()[:5]
        )
        raise CommandRejected("schema", where, command_id=(command_id or "")[:64]) from None


class ReplayGuard:
    """Refuses a command seen before or issued outside the staleness window."""

    def __init__(self, *, window_s: float = STALE_AFTER_S, remember: int = 4096) -> None:
        self.window_s = window_s
        self._remember = remember
        self._seen: OrderedDict[str, float] = OrderedDict()

    def admit(self, command: Command, *, now: float) -> None:
        """Accept ``command`` once; raise CommandRejected for replays and stale ones."""
        try:
            issued = parse_rfc3339(command.issued_at)
        except AgentError:
            raise CommandRejected(
                "schema", "issued_at is not an RFC 3339 time", command_id=command.command_id
            ) from None
        if command.command_id in self._seen:
            raise CommandRejected("replay", command_id=command.command_id)
        if issued < now - self.window_s:
            raise CommandRejected(
                "stale", f"issued {now - issued:.0f} s ago", command_id=command.command_id
            )
        if issued > now + FUTURE_SKEW_S:
            raise CommandRejected(
                "from-the-future",
                f"issued {issued - now:.0f} s ahead of the device clock",
                command_id=command.command_id,
            )
        self._seen[command.command_id] = issued
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
