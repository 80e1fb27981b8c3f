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
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import TamperedRecord
from agent.store.keys import KeyStore

NONCE_BYTES: Final = 12
_VERSION: Final = b"\x01"


class Vault:
    """Seals and opens records under one key.

    The AEAD object is made for each operation rather than kept: it holds about 2.5 KiB
    of OpenSSL state, three vaults a device, and costs under 2 us to make against an
    operation's tens (``python -m bench.profile --memory``)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        AESGCM(key)  # a key of the wrong size fails here, not at first use
        self._key = key

    @classmethod
    def open_or_create(cls, keys: KeyStore, name: str) -> Vault:
        """The vault of key ``name``, made (and stored) first if there is none."""
        key = keys.load(name)
        return cls(key if key is not None else keys.create(name))

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to ``aad``."""
        nonce = os.urandom(NONCE_BYTES)
        return _VERSION + nonce + AESGCM(self._key).encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes, *, table: str, row_id: object) -> bytes:
        """Decrypt a sealed record; TamperedRecord if it was altered, moved or truncated."""
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != _VERSION:
            raise TamperedRecord(table, row_id, "truncated or unknown format")
        nonce, body = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            return AESGCM(self._key).decrypt(nonce, body, aad)
        except InvalidTag:
            raise TamperedRecord(table, row_id) from None
