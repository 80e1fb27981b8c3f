"""Where device keys live: the ``KeyStore`` seam and its file implementation.

``FileKeyStore`` keeps each key in a 0600 file. A TPM or secure element plugs in
behind the same three methods on real hardware.
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


@guard_public_methods(lambda keys: keys.directory)
class FileKeyStore:
    """Keys as 0600 files in one directory; OS errors leave as StorageError."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

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
        """A fresh key, written durably before it is used."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        write_private(self._path(name), key)
        return key

    def destroy(self, name: str) -> None:
        """Overwrite and unlink the key file."""
        shred_file(self._path(name))
