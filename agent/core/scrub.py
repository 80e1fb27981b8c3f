"""Scrub text of paths, e-mail addresses, secrets, coordinates, numbers and MAC addresses (P12).

The rules are deliberately greedy: a crash signature that loses a little detail is
cheap, a token that reaches the cloud is not.
"""

from __future__ import annotations

import re
from typing import Final

MAX_STACK: Final = 16_384

# The names of secrets, not secrets.
_SECRET_NAMES: Final = "|".join(
    (
        r"password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth|session|cookie",
        r"bearer|psk|passphrase|credentials?|private[_-]?key",
    )
)

_RULES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # Key material in PEM armour.
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]{1,40}-----.*?(?:-----END [A-Z0-9 ]{1,40}-----|$)", re.S),
        "<key>",
    ),
    # Credentials and Wi-Fi secrets in key=value / key: value / key value form, the key
    # name possibly decorated (aws_secret_access_key, wpa_passphrase, wifi-psk).
    (
        re.compile(
            rf"(?i)\b([A-Za-z0-9_.-]{{0,40}}(?:{_SECRET_NAMES})[A-Za-z0-9_.-]{{0,40}})"
            r"(\s*[:=]\s*|\s+)(['\"]?)[^\s'\",;]+\3"
        ),
        r"\1\2<redacted>",
    ),
    # Cloud access key IDs (AWS and look-alikes).
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA)[0-9A-Z]{12,20}\b"), "<key>"),
    # JSON Web Tokens.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "<token>"),
    # E-mail addresses in any script. Bounded parts: unbounded ones backtrack
    # quadratically on long runs.
    (re.compile(r"[\w.%+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}"), "<email>"),
    # MAC addresses (colon, dash or dot groups).
    (re.compile(r"(?i)\b[0-9a-f]{2}(?:[:-][0-9a-f]{2}){5}\b"), "<mac>"),
    (re.compile(r"(?i)\b[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}\b"), "<mac>"),
    # Coordinates and other precise decimals: three or more decimal places.
    (re.compile(r"[-+]?\b\d{1,3}\.\d{3,}"), "<number>"),
    # Phone numbers: seven or more digits, possibly grouped and with a country code.
    (re.compile(r"(?:\+|\b00)?\d(?:[\s().-]{0,2}\d){6,}"), "<number>"),
    # File paths: home directories first (so a relative remainder is not kept), then
    # every absolute path of two or more parts, Unix or Windows.
    (re.compile(r"(/home/|/Users/|/var/home/)[^/\s\"']+"), r"\1<user>"),
    (re.compile(r"(?i)([A-Z]:\\+Users\\+)[^\\\s\"']+"), r"\1<user>"),
    (re.compile(r"(?:/[^\s/\"':,;()]+){2,}/?"), "<path>"),
    (re.compile(r"(?i)\b[A-Z]:\\[^\s\"']+"), "<path>"),
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
