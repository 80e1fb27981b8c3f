"""Mutual-TLS client contexts (P8) and the mapping of ssl failures to our errors.

There is deliberately no switch that disables verification: the broker's
certificate chain and host name are always checked, TLS 1.2 is the floor, and a
client certificate is always presented.
"""

from __future__ import annotations

import ssl
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
