"""The dev PKI: key types, permissions, names, and refusal of unsafe device IDs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import InvalidDeviceId, PkiError
from simulator.pki import DevPki


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def test_layout_keys_and_permissions(tmp_path: Path) -> None:
    pki = DevPki(tmp_path / "pki").ensure()
    dev = pki.issue_device("dev-1")
    for key in (tmp_path / "pki" / "ca.key", pki.broker.key, pki.backend.key, dev.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    cert = x509.load_pem_x509_certificate(dev.cert.read_bytes())
    assert _cn(cert) == "dev-1"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    broker = x509.load_pem_x509_certificate(pki.broker.cert.read_bytes())
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    first = DevPki(tmp_path).ensure().ca_cert.read_bytes()
    assert DevPki(tmp_path).ensure().ca_cert.read_bytes() == first


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "$x", "", "sp ace", "smartmi-backend"])
def test_refuses_unsafe_device_ids_before_writing(tmp_path: Path, bad: str) -> None:
    pki = DevPki(tmp_path).ensure()
    with pytest.raises(InvalidDeviceId):
        pki.issue_device(bad)
    assert not (tmp_path / "devices").exists()


def test_bulk_issue_keeps_existing(tmp_path: Path) -> None:
    # Bulk issue works and leaves existing identities alone; its speed is benchmarked.
    pki = DevPki(tmp_path).ensure()
    ids = [f"bulk-{i}" for i in range(200)]
    made = pki.ensure_devices(ids)
    assert len(made) == 200
    before = made["bulk-7"].cert.read_bytes()
    pki.ensure_devices(ids)
    assert made["bulk-7"].cert.read_bytes() == before


def test_backend_consumers_and_broker_names(tmp_path: Path) -> None:
    pki = DevPki(tmp_path).ensure()
    one = x509.load_pem_x509_certificate(pki.backend_consumer(1).cert.read_bytes())
    assert one.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "smartmi-backend-1"
    assert pki.backend_consumer(0) == pki.backend
    pki.issue_server(pki.broker, "localhost", names=["broker.lab", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(pki.broker.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.lab" in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"10.0.0.5", "127.0.0.1"}
    with pytest.raises(PkiError, match="neither an IP address nor a host name"):
        pki.issue_server(pki.broker, "localhost", names=["bad name!"])


@pytest.mark.parametrize("name", ["smartmi-backend-1", "smartmi-backend-16", "smartmi-backend"])
def test_backend_consumer_names_are_no_device_ids(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidDeviceId, match="reserved name"):
        DevPki(tmp_path).device(name)
