"""What a cloud command does (SPEC §3): the latest choice wins, narrowing never waits.

Pure. ``take`` decides one parsed command against the device's settings and
returns the plan to carry out and a result per setting (no values):

* a command seen before (``Memory``) is refused as a replay;
* a command for another binding, or for no binding, is refused;
* per setting it acts on, a narrowing command (withdraw, suspend, unbind,
  account-cancelled, a coarser precision or ``off``) is applied whatever its age or
  the device's clock skew, unless it is certainly older than the setting's latest
  change; a widening one (grant, resume, a finer precision) must be fresh (not
  stale, not from the future) and certainly newer than the latest change
  (``agent.core.ordering``);
* a narrowing command certainly older than the setting's latest change leaves the
  setting's value alone but still covers the data that existed when it was made:
  every item captured before that latest change (on the device's clock, with every
  error the conversion may carry) is deleted, or its location coarsened (SPEC §3);
* a command that was taken, applied or ignored, is remembered in the same plan, so
  it is applied exactly once even if its acknowledgement never reached the broker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from agent.core import rules
from agent.core.commands import (
    AccountCancelledCommand,
    Command,
    ConsentCommand,
    OwnerCommand,
    PrecisionCommand,
    ResumeCommand,
    SuspendCommand,
    UnbindCommand,
    check_fresh,
)
from agent.core.lifecycle import Event
from agent.core.location import Precision
from agent.core.ordering import Direction, Stamp, admit, order
from agent.core.rules import Plan
from agent.core.settings import CoreConfig, Settings
from agent.errors import CommandRejected


@dataclass(frozen=True, slots=True)
class Taken:
    """A command's plan and what it did, setting by setting (``applied`` or why not)."""

    plan: Plan
    result: dict[str, Any]

    @property
    def applied(self) -> bool:
        """Whether any part of the command changed a setting."""
        return any(v == "applied" or isinstance(v, dict) for v in self.result.values())


def _owner(s: Settings, command: OwnerCommand) -> None:
    if s.binding_id is None:
        raise CommandRejected("not-bound", command_id=command.command_id)
    if s.binding_id != command.binding_id:
        raise CommandRejected("other-binding", command_id=command.command_id)


class _Taking:
    """One command being decided, setting by setting, on a growing plan."""

    def __init__(self, s: Settings, cfg: CoreConfig, command: Command, now: float) -> None:
        self.cfg, self.command, self.now = cfg, command, now
        self.issued = command.issued
        self.stamp = Stamp.cloud(self.issued)
        clock = s.control.clock
        self.cloud_now = now if clock is None else clock.to_cloud(now)
        self.plan = rules.unchanged(s)
        self.result: dict[str, Any] = {}

    @property
    def s(self) -> Settings:
        return self.plan.settings

    def admitted(self, key: str, direction: Direction, latest: Stamp | None) -> Stamp | None:
        """The stamp the setting ``key`` gets if the command may change it; None (and
        why, in the result) if it may not.

        A narrowing command applied although the order is unknown does not make the
        setting look older than its latest change: the setting keeps that stamp, so a
        widening command issued in between can never pass for newer.
        """
        if direction == "widening":
            check_fresh(self.command, self.issued, self.cloud_now)
            if self.s.control.memory.full:
                raise CommandRejected("memory-full", command_id=self.command.command_id)
        why = admit(direction, self.issued, latest)
        if why is not None:
            self.result[key] = (
                "ignored: older than the latest change"
                if why == "older"
                else "ignored: not certainly newer than the latest change (the order is unknown)"
            )
            return None
        self.result[key] = "applied"
        if latest is not None and order(self.issued, latest) != "newer":
            return latest
        return self.stamp

    def earlier(self, key: str, direction: Direction, latest: Stamp | None) -> float | None:
        """For a narrowing command that ``admitted`` refused as older than the setting's
        latest change: the device time before which the items it covers were captured
        (SPEC §3: a narrowing choice covers the data that existed when it was made).
        None for a widening command, which covers nothing."""
        if direction != "narrowing" or latest is None:
            return None
        self.result[key] = "applied to earlier data: older than the latest change"
        return rules.captured_before(self.s, latest, self.now)

    def add(self, nxt: Plan) -> None:
        self.plan = self.plan.then(nxt)


def take(s: Settings, cfg: CoreConfig, command: Command, *, now: float, msg_id: str) -> Taken:
    """Decide ``command``; raises CommandRejected when it may not be taken at all."""
    if s.control.memory.knows(command.command_id):
        raise CommandRejected("replay", command_id=command.command_id)
    if isinstance(command, OwnerCommand):
        _owner(s, command)
    t = _Taking(s, cfg, command, now)
    match command:
        case ConsentCommand():
            _consent(t, command, msg_id)
        case PrecisionCommand():
            level = Precision(command.precision)
            coarser = rules.is_coarser(level, s.precision) or level is s.precision
            direction: Direction = "narrowing" if coarser else "widening"
            latest = s.stamps.get("precision")
            if stamp := t.admitted("precision", direction, latest):
                t.add(rules.set_precision(t.s, level, now=now, stamp=stamp))
            elif (before := t.earlier("precision", direction, latest)) is not None:
                t.add(rules.coarsened_earlier(t.s, level, before=before))
        case UnbindCommand() | AccountCancelledCommand():
            event = Event.UNBIND if isinstance(command, UnbindCommand) else Event.ACCOUNT_CANCELLED
            t.result["binding"] = "applied"
            t.add(rules.wipe(t.s, cfg, event, now=now, msg_id=msg_id))
        case SuspendCommand() | ResumeCommand():
            value = isinstance(command, SuspendCommand)
            direction = "narrowing" if value else "widening"
            latest = s.control.suspension
            if stamp := t.admitted("suspension", direction, latest):
                t.add(
                    rules.suspension(
                        t.s, cfg, value, now=now, source="cloud", msg_id=msg_id, stamp=stamp
                    )
                )
            elif (before := t.earlier("suspension", direction, latest)) is not None:
                t.add(rules.suspended_earlier(t.s, before=before))
    memory = t.s.control.memory.remember(command.command_id, t.issued, now)
    settings = t.s.with_control(dataclasses.replace(t.s.control, memory=memory))
    return Taken(dataclasses.replace(t.plan, settings=settings), t.result)


def _consent(t: _Taking, command: ConsentCommand, msg_id: str) -> None:
    for purpose, granted in command.purposes.items():
        if granted and command.policy_version != t.cfg.policy_version:
            # P6: a grant under another policy version is not consent to this one.
            raise CommandRejected(
                "policy-version",
                f"grant under {command.policy_version!r}, the device runs {t.cfg.policy_version!r}",
                command_id=command.command_id,
            )
        key = f"consent:{purpose.value}"
        direction: Direction = "widening" if granted else "narrowing"
        latest = t.s.stamps.get(key)
        stamp = t.admitted(key, direction, latest)
        if stamp is None:
            if (before := t.earlier(key, direction, latest)) is not None:
                t.add(rules.withdrawn_earlier(t.s, purpose, before=before))
            continue
        if granted:
            t.add(
                rules.grant(
                    t.s, t.cfg, purpose, now=t.now, source="cloud", msg_id=msg_id, stamp=stamp
                )
            )
        else:
            t.add(rules.withdraw(t.s, t.cfg, purpose, now=t.now, source="cloud", stamp=stamp))
