"""Crash diagnostics minimal by structure (SPEC §2 P12).

A crash report leaves the device as an exception type and stack frames (module,
function, line), nothing else from the crash text. Everything free-form is dropped,
not scrubbed: the exception message, source lines, variable values, and the path of
any file outside the software (a frame there keeps its function and line, and its
module reads ``<external>``). What remains is names, and each name must be a plain
identifier that the scrubber leaves unchanged and that does not contain the
device's serial or ID; a name that fails is replaced by a placeholder.

Frames are read from Python tracebacks (``File "...", line N, in f``), gdb and
sanitizer backtraces (``#3 0x... in f (...) at file.c:12``) and bare ``at file:line``
lines. Whatever else the text holds is ignored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from agent.core.scrub import scrub

MAX_FRAMES: Final = 64  # the innermost ones are kept
UNKNOWN: Final = "unknown"
EXTERNAL: Final = "<external>"
REDACTED: Final = "<redacted>"

_IDENT: Final = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
DOTTED: Final = re.compile(rf"{_IDENT}(?:\.{_IDENT}){{0,15}}", re.ASCII)
_SPECIAL_FUNCTIONS: Final = frozenset(
    {"<module>", "<lambda>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<unknown>"}
)
# Where the software lives: a path is kept (as a module name) only below one of these.
_SOFTWARE_ROOTS: Final = re.compile(
    r"(?<![^/])(?:site-packages|dist-packages|lib/python3(?:\.\d+)?|opt/smartmi|usr/lib/smartmi)/"
)
_SOURCE_SUFFIX: Final = re.compile(r"\.(?:py|pyc|c|cc|cpp|cxx|h|hpp|rs|go|so(?:\.[0-9.]+)?)$")

_PYTHON_FRAME: Final = re.compile(
    r'File "(?P<path>[^"\n]{1,4096})", line (?P<line>\d{1,9})(?:, in (?P<function>[^\n]{1,256}))?'
)
_GDB_FRAME: Final = re.compile(
    r"^\s*#\d{1,4}\s+(?:0x[0-9a-fA-F]{1,16}\s+in\s+)?(?P<function>[^\s(]{1,256})\s*\("
    r"[^\n]*?(?:\)\s+at\s+(?P<path>[^\s:]{1,4096}):(?P<line>\d{1,9}))?\s*$",
    re.MULTILINE,
)
_AT_FRAME: Final = re.compile(r"(?:^|\s)at\s+(?P<path>[^\s:()]{1,4096}):(?P<line>\d{1,9})\b")
# A Python traceback's last line: the exception's (dotted) name, alone or before ':'.
_EXCEPTION_LINE: Final = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.]{0,255})(?=:|\s*$)")
_TYPE_AT_START: Final = re.compile(r"\s*(?P<name>[A-Za-z_][A-Za-z0-9_.]{0,255})(?=$|[:\s(,])")


@dataclass(frozen=True, slots=True)
class Frame:
    """One stack frame as it leaves the device."""

    module: str
    function: str
    line: int

    def to_json(self) -> dict[str, Any]:
        """The frame in the crash schema."""
        return {"module": self.module, "function": self.function, "line": self.line}


@functools.lru_cache(maxsize=1024)
def module_of(path: str) -> str:
    """A dotted module name for a file inside the software, else ``<external>``.

    A relative path is the software's own (tracebacks print those for frames of
    the running program); an absolute one counts only below a software root. Pure, and
    a device's crashes name the same few files again and again: remembered.
    """
    p = path.replace("\\", "/")
    if p.startswith("<") and p.endswith(">"):  # <frozen importlib._bootstrap>, <string>
        return EXTERNAL
    roots = list(_SOFTWARE_ROOTS.finditer(p))
    if roots:
        rest = p[roots[-1].end() :]
    elif p.startswith("/") or re.match(r"[A-Za-z]:/", p) or ".." in p.split("/"):
        return EXTERNAL
    else:
        rest = p.removeprefix("./")
    parts = [part for part in _SOURCE_SUFFIX.sub("", rest).split("/") if part]
    if parts and parts[-1] == "__init__":
        parts.pop()
    name = ".".join(parts)
    return name if parts and DOTTED.fullmatch(name) else EXTERNAL


def _clean(name: str, secrets: Iterable[str]) -> str | None:
    """``name`` if nothing in it could be personal, else None.

    The device's own identifiers are compared by their letters and digits alone, so
    ``handle_SN_1`` counts as containing the serial ``SN-1``.
    """
    folded = _fold(name)
    if any((s := _fold(secret)) and s in folded for secret in secrets):
        return None
    return name if _unscrubbed(name) else None


@functools.lru_cache(maxsize=1024)
def _unscrubbed(name: str) -> bool:
    """Whether the scrubber leaves ``name`` as it is (pure: remembered)."""
    return scrub(name) == name


def _fold(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def _function(raw: str | None, secrets: Iterable[str]) -> str:
    if raw is None:
        return "<unknown>"
    raw = raw.strip()
    if raw in _SPECIAL_FUNCTIONS:
        return raw
    # C++ and Rust qualify with '::'; a dotted or qualified name keeps its last part.
    name = re.split(r"::|\.", raw)[-1]
    if not re.fullmatch(_IDENT, name, re.ASCII):
        return "<unknown>"
    return _clean(name, secrets) or REDACTED


def _module(path: str | None, secrets: Iterable[str]) -> str:
    if path is None:
        return EXTERNAL
    name = module_of(path)
    if name == EXTERNAL:
        return name
    return _clean(name, secrets) or REDACTED


def frames_of(stack: str, *, secrets: Iterable[str] = ()) -> tuple[Frame, ...]:
    """The frames in a crash text, outermost first, at most the innermost MAX_FRAMES."""
    secrets = tuple(secrets)
    found: list[tuple[int, Frame]] = []
    for m in _PYTHON_FRAME.finditer(stack):
        frame = Frame(
            _module(m["path"], secrets), _function(m["function"], secrets), int(m["line"])
        )
        found.append((m.start(), frame))
    if not found:
        for m in _GDB_FRAME.finditer(stack):
            line = int(m["line"]) if m["line"] else 0
            frame = Frame(_module(m["path"], secrets), _function(m["function"], secrets), line)
            found.append((m.start(), frame))
        if found:
            # gdb prints the innermost frame first; the schema reads outermost first.
            found.reverse()
    if not found:
        for m in _AT_FRAME.finditer(stack):
            frame = Frame(_module(m["path"], secrets), "<unknown>", int(m["line"]))
            found.append((m.start(), frame))
    return tuple(f for _, f in found)[-MAX_FRAMES:]


def exception_of(signature: str, stack: str, *, secrets: Iterable[str] = ()) -> str:
    """The exception or signal type: the name of a Python traceback's exception line,
    else the leading name of the signature; ``unknown`` when neither has one.

    The exception line is the traceback's last line only when it is one: flush left,
    a name alone or followed by ``:`` (``ValueError: ...``). A traceback cut short ends
    on a frame or on free text, and no word of that may pass for a type (P12)."""
    lines = [ln for ln in stack.splitlines() if ln.strip()]
    if lines and "Traceback (most recent call last)" in stack:
        m = _EXCEPTION_LINE.match(lines[-1])
        if m and DOTTED.fullmatch(m["name"]) and m["name"] != "Traceback":
            return _clean(m["name"], tuple(secrets)) or REDACTED
    m = _TYPE_AT_START.match(signature)
    if m and DOTTED.fullmatch(m["name"]):
        return _clean(m["name"], tuple(secrets)) or REDACTED
    return UNKNOWN


def minimal(signature: str, stack: str, *, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The crash's exception, frames and signature, and nothing else of its text."""
    secrets = tuple(secrets)
    exception = exception_of(signature, stack, secrets=secrets)
    frames = frames_of(stack, secrets=secrets)
    where = next((f for f in reversed(frames) if f.module != EXTERNAL), None)
    signature_out = (
        exception if where is None else f"{exception} in {where.module}.{where.function}"
    )
    return {
        "exception": exception,
        "frames": [f.to_json() for f in frames],
        "signature": signature_out[:256],
    }
