"""Cloud commands carried out on the device, once admitted by ``agent.core.commands``."""

from __future__ import annotations

from typing import Any

from agent.core.commands import (
    AccountCancelledCommand,
    Command,
    ConsentCommand,
    OwnerCommand,
    PrecisionCommand,
    ResumeCommand,
    SuspendCommand,
    UnbindCommand,
)
from agent.core.location import Precision
from agent.device import Device
from agent.errors import CommandRejected


def _check_owner(device: Device, command: OwnerCommand) -> None:
    binding = device.settings.binding_id
    if binding is None:
        raise CommandRejected("not-bound", command_id=command.command_id)
    if binding != command.binding_id:
        raise CommandRejected("other-binding", command_id=command.command_id)


def apply(device: Device, command: Command, *, now: float) -> dict[str, Any]:
    """Carry out an admitted command on the device; returns what changed (no values)."""
    if isinstance(command, OwnerCommand):
        _check_owner(device, command)
    match command:
        case ConsentCommand():
            if command.policy_version != device.config.policy_version and any(
                command.purposes.values()
            ):
                # P6: a grant under another policy version is not consent to this one.
                raise CommandRejected(
                    "policy-version",
                    f"grant under {command.policy_version!r}, the device runs "
                    f"{device.config.policy_version!r}",
                    command_id=command.command_id,
                )
            result: dict[str, Any] = {}
            for purpose, granted in command.purposes.items():
                if granted:
                    result[purpose.value] = device.grant(purpose, now=now, source="cloud")
                else:
                    result[purpose.value] = len(device.withdraw(purpose, now=now, source="cloud"))
            return result
        case PrecisionCommand():
            device.set_precision(Precision(command.precision), now=now)
            return {"precision": command.precision}
        case UnbindCommand():
            return {"deletion_request": device.unbind(now=now)}
        case AccountCancelledCommand():
            return {"deletion_request": device.account_cancelled(now=now)}
        case SuspendCommand():
            device.set_suspended(True, now=now, source="cloud")
            return {"suspended": True}
        case ResumeCommand():
            device.set_suspended(False, now=now, source="cloud")
            return {"suspended": False}
    raise CommandRejected("unknown-command")  # pragma: no cover  # the match is exhaustive
