"""At start the daemon checks that its certificate is its own and that the key is the
certificate's (SPEC §3: the device ID is the certificate's CN)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.runtime.tls import check_identity
from simulator.pki import DevPki
from tests.device.helpers import as_other_user, shared_dir


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    pki = DevPki(tmp_path_factory.mktemp("pki")).ensure()
    pki.ensure_devices(["dev-a", "dev-b"])
    return pki


def test_the_devices_own_certificate_and_key_pass(pki: DevPki) -> None:
    ident = pki.device("dev-a")
    check_identity(ident.cert, ident.key, "dev-a")


def test_another_devices_certificate_is_named(pki: DevPki) -> None:
    ident = pki.device("dev-b")
    with pytest.raises(
        ConfigError, match=r"is the certificate of 'dev-b', but \[device\] id is 'dev-a'"
    ):
        check_identity(ident.cert, ident.key, "dev-a")


def test_a_key_of_another_certificate_is_named(pki: DevPki) -> None:
    a, b = pki.device("dev-a"), pki.device("dev-b")
    with pytest.raises(ConfigError, match=r"is not the private key of .*dev-a\.pem"):
        check_identity(a.cert, b.key, "dev-a")


def test_a_certificate_given_as_the_key_is_named(pki: DevPki, tmp_path: Path) -> None:
    a = pki.device("dev-a")
    fake = tmp_path / "key.pem"
    fake.write_bytes(a.cert.read_bytes())
    fake.chmod(0o600)
    with pytest.raises(ConfigError, match=r"key\.pem is not a usable private key: a certificate"):
        check_identity(a.cert, fake, "dev-a")


def test_an_unreadable_key_is_named(pki: DevPki) -> None:
    a = pki.device("dev-a")
    with shared_dir() as folder:
        cert, key = folder / "dev.pem", folder / "dev.key"
        cert.write_bytes(a.cert.read_bytes())
        cert.chmod(0o644)
        key.write_bytes(a.key.read_bytes())
        key.chmod(0o000)  # root's, as left by a copy made as root
        with (
            as_other_user(),
            pytest.raises(
                ConfigError, match=r"cannot read the private key .*dev\.key: Permission denied"
            ),
        ):
            check_identity(cert, key, "dev-a")


def test_an_encrypted_key_is_named_without_a_prompt(pki: DevPki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    a = pki.device("dev-a")
    private = serialization.load_pem_private_key(a.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    locked.chmod(0o600)
    with pytest.raises(ConfigError, match=r"locked\.key is not a usable private key: it is encr"):
        check_identity(a.cert, locked, "dev-a")


@pytest.mark.parametrize(
    ("cert_text", "key_text", "message"),
    [
        (b"hello", None, r"dev\.pem is not a PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", None, "not a PEM"),
        (None, b"hello", r"dev\.key is not a usable private key: no PEM key"),
        (
            None,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            r"dev\.key is not a usable private key",
        ),
    ],
)
def test_files_that_are_not_what_they_should_be_are_named(
    pki: DevPki, tmp_path: Path, cert_text: bytes | None, key_text: bytes | None, message: str
) -> None:
    a = pki.device("dev-a")
    cert, key = tmp_path / "dev.pem", tmp_path / "dev.key"
    cert.write_bytes(a.cert.read_bytes() if cert_text is None else cert_text)
    key.write_bytes(a.key.read_bytes() if key_text is None else key_text)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match=message):
        check_identity(cert, key, "dev-a")


def _certificate(*names: Any) -> bytes:
    """A DER certificate with the given subject: x509.NameAttribute or
    x509.RelativeDistinguishedName entries."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            n
            if isinstance(n, x509.RelativeDistinguishedName)
            else x509.RelativeDistinguishedName([n])
            for n in names
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _subjects() -> list[list[Any]]:
    from cryptography import x509
    from cryptography.x509.name import _ASN1Type  # how a string is encoded in DER
    from cryptography.x509.oid import NameOID

    def attr(oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type | None = None) -> Any:
        if kind is None:
            return x509.NameAttribute(oid, value)
        return x509.NameAttribute(oid, value, kind)

    cn, org = NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME
    return [
        [attr(cn, "dev-a")],
        [attr(org, "Smartmi"), attr(cn, "dev-b")],  # CN not first
        [attr(cn, "Gerät-ü-设备")],  # UTF8String
        [attr(cn, "PRINTABLE 1", _ASN1Type.PrintableString)],
        [attr(cn, "bmp-Ω", _ASN1Type.BMPString)],
        [attr(cn, "x" * 60), attr(org, "y" * 200)],  # a long subject: two-byte lengths
        [attr(org, "no common name")],
        [attr(cn, "first"), attr(cn, "second")],
        [x509.RelativeDistinguishedName([attr(org, "multi"), attr(cn, "in-one-rdn")])],
    ]


@pytest.mark.parametrize("names", _subjects())
def test_the_common_name_is_read_as_cryptography_reads_it(names: list[Any]) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from agent.runtime.tls import subject_common_name

    der = _certificate(*names)
    found = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert subject_common_name(der) == (str(found[0].value) if found else None)


def test_damaged_certificates_are_a_value_error_never_a_crash() -> None:
    """Every truncation and many corrupted bytes of a real certificate: the reader says
    ValueError (the caller's "not a PEM certificate") or reads some name; it never
    raises anything else or reads past the end."""
    import random

    from agent.runtime.tls import subject_common_name

    der = _certificate(*_subjects()[1])
    cases = [der[:n] for n in range(len(der))]
    rng = random.Random(20261122)
    for _ in range(2000):
        damaged = bytearray(der)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cases.append(bytes(damaged))
    outcomes = {"value-error": 0, "read": 0}
    for case in cases:
        try:
            name = subject_common_name(case)
        except ValueError:
            outcomes["value-error"] += 1
        else:
            assert name is None or isinstance(name, str)
            outcomes["read"] += 1
    assert outcomes["value-error"] >= len(der)  # every truncation at least


def test_the_daemon_does_not_load_an_x509_parser() -> None:
    """Its resident memory has a target (35 MB in bench/): cryptography's X.509 module
    costs the daemon megabytes, and only ``doctor`` needs it."""
    import subprocess
    import sys

    code = (
        "import sys, agent.cli, agent.runtime.daemon, agent.runtime.tls; "
        "print(sorted(m for m in sys.modules if m.startswith('cryptography.x509')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
