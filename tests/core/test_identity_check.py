"""At start the daemon checks that its certificate is its own and that the key is the
certificate's (SPEC §3: the device ID is the certificate's CN)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.runtime.tls import check_identity
from simulator.pki import DevPki
from tests.core.helpers import as_other_user, shared_dir


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
