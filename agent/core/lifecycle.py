"""The device lifecycle. Every transition is defined in ``TRANSITIONS`` below; an event
with no entry for the current state raises IllegalTransition.

    factory-new --bind--> activation-due --activate--> activated
        ^                      |  ^                          |
        |                      |  +------firmware-update-----+
        +------ unbind / factory-reset / account-cancelled (wipe, P9) ------+

``activation-due`` is bound with an activation to capture (its trigger is kept beside
the state); the
activation is captured as soon as its consent is in force, once per trigger (P4).
A factory reset of a device that is already factory-new wipes nothing new and
sends no deletion request: there is no binding to delete.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

from agent.errors import IllegalTransition


class State(enum.StrEnum):
    """Where the device is in its life with an owner."""

    FACTORY_NEW = "factory-new"
    ACTIVATION_DUE = "activation-due"  # bound, with an activation still to capture
    ACTIVATED = "activated"


class Event(enum.StrEnum):
    """What can happen to the device."""

    BIND = "bind"
    ACTIVATE = "activate"
    FIRMWARE_UPDATE = "firmware-update"
    UNBIND = "unbind"
    FACTORY_RESET = "factory-reset"
    ACCOUNT_CANCELLED = "account-cancelled"


Effect = Literal["none", "activation-due", "wipe"]

TRANSITIONS: Final[dict[tuple[State, Event], tuple[State, Effect]]] = {
    (State.FACTORY_NEW, Event.BIND): (State.ACTIVATION_DUE, "activation-due"),
    (State.FACTORY_NEW, Event.FACTORY_RESET): (State.FACTORY_NEW, "none"),
    (State.FACTORY_NEW, Event.FIRMWARE_UPDATE): (State.FACTORY_NEW, "none"),
    (State.ACTIVATION_DUE, Event.ACTIVATE): (State.ACTIVATED, "none"),
    (State.ACTIVATION_DUE, Event.FIRMWARE_UPDATE): (State.ACTIVATION_DUE, "activation-due"),
    (State.ACTIVATION_DUE, Event.UNBIND): (State.FACTORY_NEW, "wipe"),
    (State.ACTIVATION_DUE, Event.FACTORY_RESET): (State.FACTORY_NEW, "wipe"),
    (State.ACTIVATION_DUE, Event.ACCOUNT_CANCELLED): (State.FACTORY_NEW, "wipe"),
    (State.ACTIVATED, Event.FIRMWARE_UPDATE): (State.ACTIVATION_DUE, "activation-due"),
    (State.ACTIVATED, Event.UNBIND): (State.FACTORY_NEW, "wipe"),
    (State.ACTIVATED, Event.FACTORY_RESET): (State.FACTORY_NEW, "wipe"),
    (State.ACTIVATED, Event.ACCOUNT_CANCELLED): (State.FACTORY_NEW, "wipe"),
}


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one event: the new state and what the caller must do."""

    state: State
    effect: Effect


def step(state: State, event: Event) -> Step:
    """Apply ``event`` to ``state``; raise IllegalTransition if the table has no entry."""
    try:
        new, effect = TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state.value, event.value) from None
    return Step(new, effect)


WIPE_REASONS: Final = {
    Event.UNBIND: "unbind",
    Event.FACTORY_RESET: "factory-reset",
    Event.ACCOUNT_CANCELLED: "account-cancelled",
}
