"""Mutual-TLS client contexts (P8) and the mapping of ssl failures to our errors.

There is deliberately no switch that disables verification: the broker's
certificate chain and host name are always checked, TLS 1.2 is the floor, and a
client certificate is always presented.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

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
    """
    cert_pem = _read(cert, "certificate")
    if key.is_file():
        require_private_file(key, "the device's TLS private key")
    key_pem = _read(key, "private key")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert} is not a PEM certificate", where="[broker] cert") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        what = "a certificate, not a key" if b"CERTIFICATE-----" in key_pem else str(exc)
        raise ConfigError(
            f"{key} is not a usable private key: {what}", where="[broker] key"
        ) from None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else None
    if cn != device_id:
        raise ConfigError(
            f"{cert} is the certificate of {cn!r}, but [device] id is {device_id!r}; the "
            "broker knows a device by its certificate: use this device's own, or fix the id",
            where="[broker] cert",
        )
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(der, spki) != certificate.public_key().public_bytes(
        der, spki
    ):
        raise ConfigError(
            f"{key} is not the private key of {cert} (the two do not match)",
            where="[broker] key",
        )


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
