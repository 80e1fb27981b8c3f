"""Encryption of everything the agent stores (P8) and crypto-shredding (P9).

Records are sealed with AES-256-GCM under a per-device data key. Each record's
associated data names its table, device and row, so a record copied onto another
row fails to open. Nonces are 96 random bits from the OS, far from the birthday
bound for the number of records one device ever writes.

Keys live behind ``KeyStore`` so that a TPM or secure element can hold them on
real hardware; ``FileKeyStore`` keeps each key in a 0600 file. Destroying the data
key makes every remnant of the device's records unreadable (crypto-shredding).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import KeyMissing, StorageError, TamperedRecord
from agent.store.fsutil import shred_file, write_private

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
_VERSION: Final = b"\x01"


class KeyStore(Protocol):
    """Where device keys live."""

    def load(self, name: str) -> bytes | None:
        """The key called ``name``, or None if there is none."""

    def create(self, name: str) -> bytes:
        """Make, store and return a new random key called ``name``."""

    def destroy(self, name: str) -> None:
        """Destroy the key called ``name`` beyond recovery (no error if absent)."""


class FileKeyStore:
    """Keys as 0600 files in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def load(self, name: str) -> bytes | None:
        """The key, or None; a key file of the wrong size is an error, not a new key."""
        try:
            key = self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        if len(key) != KEY_BYTES:
            raise StorageError(f"key file {self._path(name)} is corrupt ({len(key)} bytes)")
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


class Vault:
    """Seals and opens records under one key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def open_or_create(cls, keys: KeyStore, name: str, *, create: bool) -> Vault:
        """The vault of key ``name``; KeyMissing if absent and ``create`` is false."""
        key = keys.load(name)
        if key is None:
            if not create:
                raise KeyMissing(f"key {name!r} does not exist")
            key = keys.create(name)
        return cls(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to ``aad``."""
        nonce = os.urandom(NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes, *, table: str, row_id: object) -> bytes:
        """Decrypt a sealed record; TamperedRecord if it was altered, moved or truncated."""
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != _VERSION:
            raise TamperedRecord(table, row_id, "truncated or unknown format")
        nonce, body = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise TamperedRecord(table, row_id) from None
