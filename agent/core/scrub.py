"""Scrub crash text of user paths, e-mail addresses and secrets before it is stored (P12).

The rules are deliberately greedy: a crash signature that loses a little detail is
cheap, a token that reaches the cloud is not.
"""

from __future__ import annotations

import re
from typing import Final

MAX_STACK: Final = 16_384

_RULES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # Credentials in key=value / key: value form, and Authorization headers.
    (
        re.compile(
            r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth|"
            r"session|cookie|bearer)\b(\s*[:=]\s*|\s+)(['\"]?)[^\s'\",;]+\3"
        ),
        r"\1\2<redacted>",
    ),
    # JSON Web Tokens.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "<token>"),
    # E-mail addresses.
    # Bounded local part: an unbounded one backtracks quadratically on long runs.
    (re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,255}\.[A-Za-z]{2,}"), "<email>"),
    # Home directories: /home/alice/..., /Users/alice/..., C:\Users\alice\...
    (re.compile(r"(/home/|/Users/|/var/home/)[^/\s\"']+"), r"\1<user>"),
    (re.compile(r"(?i)([A-Z]:\\+Users\\+)[^\\\s\"']+"), r"\1<user>"),
    (re.compile(r"\b[0-9a-fA-F]{20,}\b"), "<hex>"),
)


# Long opaque strings: base64/url-safe secrets of 32+ characters that mix letters and
# digits. '/' is left out so that file paths survive. Matched as plain runs and
# tested in Python: a look-ahead here would make scrubbing quadratic.
_OPAQUE: Final = re.compile(r"[A-Za-z0-9+_-]{32,}={0,2}")


def _opaque(match: re.Match[str]) -> str:
    run = match.group(0)
    if any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
        return "<token>"
    return run


def scrub(text: str) -> str:
    """Return ``text`` with user paths, e-mails and token-like strings replaced."""
    out = text[: MAX_STACK * 2]
    for pattern, repl in _RULES:
        out = pattern.sub(repl, out)
    out = _OPAQUE.sub(_opaque, out)
    return out[:MAX_STACK]
