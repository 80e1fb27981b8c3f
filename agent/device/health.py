"""The store's health as a device sees it: the storage problem in force, if any, and
writes that may spend the store's reserve when they narrow (fail closed, P2, P9)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

from agent.errors import StorageError
from agent.store import faults
from agent.store.records import DeviceStore

log = logging.getLogger("smartmi.device")

_T = TypeVar("_T")


class Health:
    """The last storage problem of one device's store; None once a write succeeded."""

    __slots__ = ("problem", "store")

    def __init__(self, store: DeviceStore) -> None:
        self.store = store
        self.problem: StorageError | None = None

    def durably(self, write: Callable[[], _T], *, narrowing: bool) -> _T:
        """Run a write; on a full disk, a narrowing write may spend the store's reserve."""
        try:
            result = write()
        except StorageError as exc:
            if not (narrowing and exc.kind == faults.FULL and self.store.db.release_reserve()):
                raise
            log.warning(
                "disk full: the reserve was released for a privacy-reducing write",
                extra={"device": self.store.device_id},
            )
            result = write()
        self.problem = None
        return result

    def failed(self, message: str, exc: StorageError, **fields: object) -> None:
        """Note a storage failure and log it: kind and message, never values."""
        self.problem = exc
        extra = {"device": self.store.device_id, "kind": exc.kind, "error": str(exc), **fields}
        log.error(message, extra=extra)  # the kind says it; no traceback

    @contextlib.contextmanager
    def noted(self) -> Iterator[None]:
        """A write that may fail without harm (nothing leaves because of it): note it."""
        try:
            yield
        except StorageError as exc:
            self.problem = exc
