"""The agent's log on stderr, one line a record, with the fields a caller chose (IDs,
counts, reasons; never payloads, locations or other personal values): a JSON object
(for journald and log shippers) or text for a person at a terminal, with ISO 8601
UTC times either way."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record``; only the fields callers chose to log, never payloads."""
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc"] = record.exc_info[0].__name__
        return json.dumps(doc, default=str)


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message (key=value ...)``, for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of text; the same fields as the JSON form."""
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info and record.exc_info[0] is not None:
            fields["exc"] = record.exc_info[0].__name__
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{_iso(record.created)} {record.levelname.lower():<7} {record.name}: "
        return line + record.getMessage() + (f" ({extra})" if extra else "")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler for whatever ``sys.stderr`` is when a record is written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        del value  # always the current sys.stderr


def setup_logging(level: int = logging.INFO, log_format: str = "json") -> None:
    """Lines on stderr, JSON or ``text``; paho's packet-level chatter only at DEBUG."""
    handler = _Stderr()
    handler.setFormatter(TextFormatter() if log_format == "text" else JsonFormatter())
    root = logging.getLogger()
    # Ours replaces an earlier one of ours (a second call), and nothing else.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _Stderr)] + [handler]
    root.setLevel(level)
    logging.getLogger("smartmi.mqtt").setLevel(max(level, logging.WARNING))
    logging.getLogger("mqtt").setLevel(max(level, logging.WARNING))
