"""The user's choice of an enumerated setting, read from text; errors list the options."""

from __future__ import annotations

import enum
from typing import TypeVar

from agent.errors import SchemaError

E = TypeVar("E", bound=enum.StrEnum)


def parse_choice(kind: type[E], value: str, what: str) -> E:
    """``kind(value)``, or a SchemaError naming ``what`` and every valid value."""
    try:
        return kind(value)
    except ValueError:
        options = ", ".join(member.value for member in kind)
        raise SchemaError(f"unknown {what} {value!r}; use one of {options}") from None
