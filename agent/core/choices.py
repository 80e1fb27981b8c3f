"""The user's choice of an enumerated setting, read from text; errors list the options."""

from __future__ import annotations

import difflib
import enum
from typing import TypeVar

from agent.errors import SchemaError

E = TypeVar("E", bound=enum.StrEnum)


def parse_choice(kind: type[E], value: str, what: str) -> E:
    """``kind(value)``, or a SchemaError naming ``what``, the closest valid value if
    one is close, and every valid value."""
    try:
        return kind(value)
    except ValueError:
        values = [member.value for member in kind]
        close = difflib.get_close_matches(value, values, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SchemaError(
            f"unknown {what} {value!r}{hint}; use one of {', '.join(values)}"
        ) from None
