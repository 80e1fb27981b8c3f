"""tests/core is the pure part of the suite: no database, no event loop, no child
process. A test here that opens SQLite, starts an event loop or spawns a process
fails, whatever it imports; such a test belongs in tests/device or tests/runtime."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class ImpureTest(AssertionError):
    """A test in tests/core reached for I/O the pure suite does without."""


def _refuse(what: str) -> Any:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise ImpureTest(f"tests/core is pure: {what} is not allowed here")

    return refuse


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _pure():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _pure():
        return (yield)


class _pure:
    """Refuse SQLite, event loops and child processes while a test sets up and runs."""

    def __enter__(self) -> None:
        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(sqlite3, "connect", _refuse("opening SQLite"))
        for run in ("run_forever", "run_until_complete"):
            self._patch.setattr(asyncio.BaseEventLoop, run, _refuse("running an event loop"))
        self._patch.setattr(subprocess.Popen, "_execute_child", _refuse("a child process"))

    def __exit__(self, *_exc: object) -> None:
        self._patch.undo()
