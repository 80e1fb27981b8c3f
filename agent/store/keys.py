"""Where device keys live: the ``KeyStore`` seam and its file implementation.

``FileKeyStore`` keeps each key in a 0600 file. A TPM or secure element plugs in
behind the same methods on real hardware: keys become sealed objects or slots
(``load``/``create``/``destroy``), and the monotonic counters that detect a rolled-back
store (``counter``/``advance``) become NV counters (TPM2_NV_Increment), which no
copy of the SD card can roll back. In files, both live apart from the database but on
the same card: a rollback of the whole card, keys and counters included, is not
detectable there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import StorageError
from agent.store.faults import guard_public_methods
from agent.store.fsutil import require_private_file, shred_file, write_private

KEY_BYTES = 32


class KeyStore(Protocol):
    """Where device keys live."""

    def load(self, name: str) -> bytes | None:
        """The key called ``name``, or None if there is none."""

    def create(self, name: str) -> bytes:
        """Make, store and return a new random key called ``name``."""

    def destroy(self, name: str) -> None:
        """Destroy the key called ``name`` beyond recovery (no error if absent)."""

    def counter(self, name: str) -> int:
        """The monotonic counter called ``name`` (0 if it was never advanced)."""

    def advance(self, name: str, value: int) -> None:
        """Raise the counter ``name`` to ``value``; it never goes down."""


@guard_public_methods(lambda keys: keys.directory)
class FileKeyStore:
    """Keys as 0600 files in one directory; OS errors leave as StorageError."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        self.durable = durable
        # Without ``durable`` (a simulated fleet) counters are kept here and written by
        # ``flush``: a counter that lags behind the database is never a false alarm,
        # and one file written per state save was a tenth of a fleet's CPU.
        self._counters: dict[str, int] = {}
        self._unwritten: set[str] = set()

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def load(self, name: str) -> bytes | None:
        """The key, or None; a key file of the wrong size, or one that others may read,
        is an error, not a new key."""
        path = self._path(name)
        try:
            require_private_file(path, "a data key")
            key = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(key) != KEY_BYTES:
            raise StorageError(
                f"key file {self._path(name)} is corrupt ({len(key)} bytes)", kind="corrupt"
            )
        return key

    def create(self, name: str) -> bytes:
        """A fresh key, written durably before it is used (unless the store was made for
        a simulated fleet, whose database survives a process crash only, too)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        write_private(self._path(name), key, durable=self.durable)
        return key

    def destroy(self, name: str) -> None:
        """Overwrite and unlink the key file."""
        shred_file(self._path(name))

    def _counter_path(self, name: str) -> Path:
        return self.directory / f"{name}.counter"

    def counter(self, name: str) -> int:
        """The counter's value; a damaged counter file reads as corrupt, never as 0."""
        if name in self._counters:
            return self._counters[name]
        try:
            text = self._counter_path(name).read_text()
        except FileNotFoundError:
            text = "0"
        if not text.strip().isdigit():
            raise StorageError(
                f"counter file {self._counter_path(name)} is corrupt", kind="corrupt"
            )
        value = int(text)
        if not self.durable:
            # A fleet's store is the only writer of its counters: read each file once
            # (a file read per device and state save was about 4 % of the event loop's
            # CPU in a fleet start).
            self._counters[name] = value
        return value

    def advance(self, name: str, value: int) -> None:
        """Write the new value durably, or, for a simulated fleet, at the next ``flush``."""
        if value <= self.counter(name):
            return
        if self.durable:
            self._write_counter(name, value)
        else:
            self._counters[name] = value
            self._unwritten.add(name)

    def flush(self) -> int:
        """Write the counters advanced since the last flush; returns how many."""
        written = 0
        for name in sorted(self._unwritten):
            self._write_counter(name, self._counters[name])
            self._unwritten.discard(name)  # a failed write stays for the next flush
            written += 1
        return written

    def _write_counter(self, name: str, value: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self._counter_path(name), str(value).encode(), durable=self.durable)
