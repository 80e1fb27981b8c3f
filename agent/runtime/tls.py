"""Mutual-TLS client contexts (P8) and the mapping of ssl failures to our errors.

There is deliberately no switch that disables verification: the broker's
certificate chain and host name are always checked, TLS 1.2 is the floor, and a
client certificate is always presented.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

from agent.errors import CertificateProblem, ConfigError
from agent.store.fsutil import require_private_file


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ client context that verifies the broker and presents our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for label, path in (("CA", ca), ("certificate", cert), ("key", key)):
        if not path.is_file():
            raise ConfigError(f"{label} file not found: {path}", where="tls")
    require_private_file(key, "the device's TLS private key")
    try:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot load {cert} / {key} / {ca}: {exc}", where="tls") from exc
    return ctx


def check_identity(cert: Path, key: Path, device_id: str) -> None:
    """The certificate is the device's (its CN is ``device_id``) and ``key`` is its
    private key; a ConfigError that names the file otherwise.

    A device started with another device's certificate would connect as that device
    and push it off the broker on every reconnect; a key that does not match fails
    every handshake with a bare "PEM lib" or "key values mismatch".

    Only the ssl module is used: the daemon's resident memory has a target (35 MB in
    bench/), and loading cryptography's X.509 and key parsers for this one look cost it
    about 3 MB. ``smartmi-agent doctor`` reads the certificate in full.
    """
    cert_pem = _read(cert, "certificate")
    if key.is_file():
        require_private_file(key, "the device's TLS private key")
    key_pem = _read(key, "private key")
    try:
        cn = subject_common_name(ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{cert} is not a PEM certificate", where="[broker] cert") from None
    if cn != device_id:
        raise ConfigError(
            f"{cert} is the certificate of {cn!r}, but [device] id is {device_id!r}; the "
            "broker knows a device by its certificate: use this device's own, or fix the id",
            where="[broker] cert",
        )
    if b"PRIVATE KEY-----" not in key_pem:
        what = "a certificate, not a key" if b"CERTIFICATE-----" in key_pem else "no PEM key"
        raise ConfigError(f"{key} is not a usable private key: {what}", where="[broker] key")
    try:  # OpenSSL compares the key with the certificate's public key as it loads them
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            f"{key} is not a usable private key: it is encrypted, and the agent has no "
            "passphrase to give (use an unencrypted key, readable by the agent alone)",
            where="[broker] key",
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc).upper():
            raise ConfigError(
                f"{key} is not the private key of {cert} (the two do not match)",
                where="[broker] key",
            ) from None
        raise ConfigError(
            f"{key} is not a usable private key: {exc.reason or exc}", where="[broker] key"
        ) from None


class _EncryptedKey(Exception):
    """The key asked for a passphrase."""


def _no_password() -> bytes:
    """Instead of OpenSSL's prompt on the terminal: an encrypted key is an error."""
    raise _EncryptedKey


# The few DER tags a certificate's subject uses, and how each kind of string is encoded.
_SEQUENCE, _SET, _OID, _EXPLICIT_0 = 0x30, 0x31, 0x06, 0xA0
_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x14: "latin-1",  # TeletexString, as commonly used
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}
_COMMON_NAME = bytes([0x55, 0x04, 0x03])  # 2.5.4.3


def subject_common_name(der: bytes) -> str | None:
    """The first common name (CN) in a DER certificate's subject, or None if it has
    none; ValueError if the bytes are not a certificate's structure.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber, signature, issuer, validity, subject, ... }, ... } (RFC 5280 §4.1).
    Only the structure down to the subject is read; nothing here decides trust, which
    the broker's handshake does.
    """
    tag, start, end = _element(der, 0, len(der))
    if tag != _SEQUENCE or end != len(der):
        raise ValueError("not a DER certificate")
    tag, start, end = _element(der, start, end)
    if tag != _SEQUENCE:
        raise ValueError("no tbsCertificate")
    fields = list(_elements(der, start, end))
    if fields and fields[0][0] == _EXPLICIT_0:
        fields = fields[1:]  # the version
    if len(fields) < 5 or fields[4][0] != _SEQUENCE:
        raise ValueError("no subject")
    for rdn_tag, rdn_start, rdn_end in _elements(der, fields[4][1], fields[4][2]):
        if rdn_tag != _SET:
            raise ValueError("a subject entry is not a SET")
        for atv_tag, atv_start, atv_end in _elements(der, rdn_start, rdn_end):
            parts = list(_elements(der, atv_start, atv_end))
            if atv_tag != _SEQUENCE or len(parts) != 2 or parts[0][0] != _OID:
                raise ValueError("a subject attribute is not (type, value)")
            (_, oid_start, oid_end), (value_tag, value_start, value_end) = parts
            if der[oid_start:oid_end] == _COMMON_NAME:
                encoding = _STRINGS.get(value_tag)
                if encoding is None:
                    raise ValueError(f"a common name of DER type {value_tag:#x}")
                return der[value_start:value_end].decode(encoding)
    return None


def _elements(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The DER elements between ``start`` and ``end``, one after another."""
    while start < end:
        tag, body, after = _element(der, start, end)
        yield tag, body, after
        start = after


def _element(der: bytes, at: int, end: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at ``at``, which
    must lie within ``end``."""
    if at + 2 > end:
        raise ValueError("truncated DER")
    tag, first = der[at], der[at + 1]
    at += 2
    if tag & 0x1F == 0x1F:
        raise ValueError("a multi-byte DER tag")  # none in a certificate's subject path
    if first < 0x80:
        length = first
    else:
        size = first & 0x7F
        if not 1 <= size <= 4 or at + size > end:
            raise ValueError("a bad DER length")
        length = int.from_bytes(der[at : at + size], "big")
        at += size
    if at + length > end:
        raise ValueError("truncated DER")
    return tag, at, at + length


def _read(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label} file not found: {path}", where="tls") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {label} {path}: {exc.strerror}; the agent's user needs to read it",
            where="tls",
        ) from None


_KINDS = (
    ("certificate has expired", "expired"),
    ("certificate expired", "expired"),
    ("certificate is not yet valid", "not-yet-valid"),
    ("unknown ca", "unknown-ca"),
    ("unable to get local issuer certificate", "unknown-ca"),
    ("self-signed certificate", "unknown-ca"),
    ("self signed certificate", "unknown-ca"),
    ("hostname mismatch", "hostname-mismatch"),
    ("ip address mismatch", "hostname-mismatch"),
    ("certificate required", "client-certificate-refused"),
    ("bad certificate", "client-certificate-refused"),
    ("certificate revoked", "revoked"),
    ("decrypt error", "client-certificate-refused"),
)


def classify_tls_error(exc: BaseException) -> CertificateProblem | None:
    """Map an ssl failure to a CertificateProblem, or None if it is not about certificates."""
    text = str(exc).lower()
    if isinstance(exc, ssl.SSLCertVerificationError):
        text += " " + str(exc.verify_message).lower()
    for needle, kind in _KINDS:
        if needle in text:
            return CertificateProblem(kind, str(exc))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CertificateProblem("verify-failed", str(exc))
    return None
