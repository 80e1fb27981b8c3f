"""Development PKI: a dev CA, the broker's server certificate, device and backend identities.

Everything is ECDSA P-256. The layout of a PKI directory::

    ca.pem  ca.key                 the dev CA (10 years)
    broker.pem  broker.key         server certificate, SAN localhost, 127.0.0.1, ::1
    backend.pem  backend.key       the cloud identity (CN smartmi-backend)
    observer.pem observer.key      an observer that reads every uplink (CN smartmi-observer)
    devices/<id>.pem  <id>.key     one per device, CN = device ID

Private keys are written 0600. This is for development and CI only: a production
fleet gets its identities from the factory, not from here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.core.identity import BACKEND_ID, OBSERVER_ID, backend_id, validate_device_id
from agent.errors import PkiError
from agent.store.fsutil import write_private

CA_NAME: Final = "Smartmi Dev CA"
CA_LIFETIME: Final = dt.timedelta(days=3650)
SERVER_LIFETIME: Final = dt.timedelta(days=397)  # the CA/Browser Forum ceiling for servers
CLIENT_LIFETIME: Final = dt.timedelta(days=3 * 365)
_SKEW: Final = dt.timedelta(minutes=5)  # tolerate small clock differences at issue time


@dataclass(frozen=True, slots=True)
class Identity:
    """Paths of one certificate and its private key."""

    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Smartmi Dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def subject_of(common_name: str) -> str:
    """The subject of a dev PKI certificate for ``common_name``, as RFC 4514 text
    (what NATS's ``verify_and_map`` matches a user against)."""
    return _name(common_name).rfc4514_string()


def _san(name: str) -> x509.GeneralName:
    """A host name or an IP address as a subjectAltName entry."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or len(name) > 253 or not all(c.isalnum() or c in ".-" for c in name):
        raise PkiError(f"{name!r} is neither an IP address nor a host name")
    return x509.DNSName(name)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf (ECDSA) only signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class DevPki:
    """A directory of development certificates, created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    # -- paths -------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        """The CA certificate every party trusts."""
        return self.root / "ca.pem"

    @property
    def broker(self) -> Identity:
        """The broker's server identity."""
        return Identity(self.root / "broker.pem", self.root / "broker.key")

    @property
    def backend(self) -> Identity:
        """The cloud backend's client identity."""
        return Identity(self.root / "backend.pem", self.root / "backend.key")

    def backend_consumer(self, n: int) -> Identity:
        """Backend consumer ``n`` (0: the backend itself), issued on first use."""
        if n == 0:
            return self.backend
        ident = Identity(self.root / f"backend-{n}.pem", self.root / f"backend-{n}.key")
        if not (ident.cert.exists() and ident.key.exists()):
            self._issue_client(ident, backend_id(n))
        return ident

    @property
    def observer(self) -> Identity:
        """An observer's client identity: reads every uplink, writes nothing."""
        return Identity(self.root / "observer.pem", self.root / "observer.key")

    def device(self, device_id: str) -> Identity:
        """Where the identity of ``device_id`` lives (it may not exist yet)."""
        validate_device_id(device_id)
        d = self.root / "devices"
        return Identity(d / f"{device_id}.pem", d / f"{device_id}.key")

    # -- creation ----------------------------------------------------------
    def ensure(self) -> DevPki:
        """Create the CA, broker and backend identities if they are missing."""
        self._load_or_create_ca()
        if not (self.broker.cert.exists() and self.broker.key.exists()):
            self.issue_server(self.broker, "localhost")
        if not (self.backend.cert.exists() and self.backend.key.exists()):
            self._issue_client(self.backend, BACKEND_ID)
        if not (self.observer.cert.exists() and self.observer.key.exists()):
            self._issue_client(self.observer, OBSERVER_ID)
        return self

    def _load_or_create_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self._ca is not None:
            return self._ca
        key_path = self.root / "ca.key"
        if self.ca_cert.exists() and key_path.exists():
            try:
                cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise PkiError(f"cannot read the dev CA in {self.root}: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PkiError(f"{key_path} is not an EC private key")
            self._ca = (cert, key)
            return self._ca
        self.root.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(CA_NAME))
            .issuer_name(_name(CA_NAME))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        self.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._ca = (cert, key)
        return self._ca

    def _leaf(
        self,
        ident: Identity,
        common_name: str,
        *,
        server: bool,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        durable: bool = True,
        names: Sequence[str] = (),
    ) -> Identity:
        ca_cert, ca_key = self._load_or_create_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        start = not_before or now - _SKEW
        end = not_after or now + (SERVER_LIFETIME if server else CLIENT_LIFETIME)
        if end <= start:
            raise PkiError(f"certificate for {common_name!r} would expire before it starts")
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                        *(_san(n) for n in names),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        write_private(ident.key, _key_pem(key), durable=durable)
        write_private(
            ident.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, durable=durable
        )
        return ident

    def issue_server(
        self, ident: Identity, common_name: str, names: Sequence[str] = ()
    ) -> Identity:
        """Issue a server certificate (SAN localhost, 127.0.0.1, ::1 and ``names``, host
        names or addresses other hosts reach the broker by) into ``ident``."""
        return self._leaf(ident, common_name, server=True, names=names)

    def _issue_client(self, ident: Identity, common_name: str) -> Identity:
        return self._leaf(ident, common_name, server=False)

    def issue_device(
        self,
        device_id: str,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        durable: bool = True,
    ) -> Identity:
        """Issue (or re-issue) the client certificate of one device; CN = ``device_id``."""
        ident = self.device(device_id)  # validates the ID before anything is written
        return self._leaf(
            ident,
            device_id,
            server=False,
            not_before=not_before,
            not_after=not_after,
            durable=durable,
        )

    def ensure_devices(self, device_ids: Iterable[str]) -> dict[str, Identity]:
        """Identities for many devices, issuing only the missing ones (fast, no fsync)."""
        out: dict[str, Identity] = {}
        for device_id in device_ids:
            ident = self.device(device_id)
            if not (ident.cert.exists() and ident.key.exists()):
                self._leaf(ident, device_id, server=False, durable=False)
            out[device_id] = ident
        if out:
            os.sync()  # one flush for the whole batch instead of one per file
        return out
