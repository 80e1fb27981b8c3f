"""Permissions as AWS IoT Device Client enforces them: secrets and the state directory
belong to their owner alone; what the agent creates is 0600/0700 whatever the umask."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.errors import UnsafePermissions
from agent.runtime.tls import client_context
from agent.store import fsutil
from simulator.pki import DevPki
from tests.device.helpers import OTHER_UID, as_other_user, install_identity, shared_dir
from tests.shell.conftest import GOOD


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def agent(conf: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(["--config", str(conf), "--json", *argv])
    out, err = capsys.readouterr()
    return rc, out if rc == 0 else err


def test_state_files_are_created_private_whatever_the_umask(
    conf: Path, capsys: pytest.CaptureFixture[str], open_umask: None
) -> None:
    assert agent(conf, capsys, "bind", "--binding-id", "owner-1")[0] == 0
    assert agent(conf, capsys, "consent", "grant", "activation")[0] == 0
    state = conf.parent / "state"
    assert mode(state) == 0o700
    assert mode(state / "keys") == 0o700
    for path in [state / "state.db", *state.glob("state.db-*"), *(state / "keys").iterdir()]:
        assert mode(path) == 0o600, path
    out = conf.parent / "ledger.json"
    rc, text = agent(conf, capsys, "export", "-o", str(out))
    assert rc == 0, text
    assert mode(out) == 0o600
    assert json.loads(out.read_text())["entries"]


def test_a_state_database_left_open_to_others_is_narrowed(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent(conf, capsys, "bind", "--binding-id", "owner-1")[0] == 0
    db = conf.parent / "state" / "state.db"
    db.chmod(0o644)
    assert agent(conf, capsys, "status")[0] == 0
    assert mode(db) == 0o600


def test_a_state_directory_others_can_write_is_refused(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent(conf, capsys, "bind", "--binding-id", "owner-1")[0] == 0
    state = conf.parent / "state"
    state.chmod(0o777)
    rc, err = agent(conf, capsys, "status")
    assert rc == 1
    assert f"{state} (the state directory) has mode 0777" in err
    assert f"Fix: chmod 700 {state}" in err
    assert "Traceback" not in err


def test_a_data_key_others_can_read_is_refused(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent(conf, capsys, "bind", "--binding-id", "owner-1")[0] == 0
    (key,) = (conf.parent / "state" / "keys").glob("*.data.key")
    key.chmod(0o644)
    rc, err = agent(conf, capsys, "status")
    assert rc == 1
    assert f"{key} (a data key) has mode 0644" in err
    assert f"chmod 600 {key}" in err
    # Nothing was lost: with the mode fixed, the device is as it was.
    key.chmod(0o600)
    rc, out = agent(conf, capsys, "status")
    assert rc == 0
    assert json.loads(out)["lifecycle"] == "activation-due"


def test_a_tls_private_key_others_can_read_is_refused(tmp_path: Path) -> None:
    pki = DevPki(tmp_path / "pki")
    ident = pki.ensure_devices(["perm-1"])["perm-1"]
    client_context(pki.ca_cert, ident.cert, ident.key)  # 0600 as made: accepted
    ident.key.chmod(0o640)
    with pytest.raises(UnsafePermissions, match=r"private key\) has mode 0640") as err:
        client_context(pki.ca_cert, ident.cert, ident.key)
    assert err.value.fix == f"chmod 600 {ident.key}"


def test_another_users_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(theirs, 4242, 4242)
    owner = theirs.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(UnsafePermissions, match=f"belongs to uid {owner}, not to this user"):
        fsutil.require_private_dir(theirs, "the state directory")


SERVICE_UID = OTHER_UID


@pytest.fixture
def service_conf(pki: DevPki) -> Iterator[Path]:
    """A config whose state directory and identity belong to a service user, in a place
    that user can reach."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    with shared_dir() as base:
        (base / "state").mkdir(mode=0o700)
        os.chown(base / "state", SERVICE_UID, SERVICE_UID)
        install_identity(pki, base / "pki", "cli-1")
        for path in (base / "pki", *(base / "pki").iterdir()):
            os.chown(path, SERVICE_UID, SERVICE_UID)
        path = base / "agent.toml"
        path.write_text(GOOD.replace('state_dir = "state"', f'state_dir = "{base / "state"}"'))
        yield path


def as_service_user(conf: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with as_other_user(SERVICE_UID):
        return agent(conf, capsys, *argv)


def test_a_verb_root_runs_leaves_files_the_service_user_can_use(
    service_conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = service_conf.parent / "state"
    assert agent(service_conf, capsys, "bind", "--binding-id", "B1")[0] == 0
    owners = {p.relative_to(state): p.lstat().st_uid for p in state.rglob("*")}
    assert owners
    assert set(owners.values()) == {SERVICE_UID}, owners
    rc, out = as_service_user(service_conf, capsys, "status")
    assert rc == 0, out
    assert json.loads(out)["lifecycle"] == "activation-due"  # the bind root made
    assert os.geteuid() == 0  # root switched back


def test_files_root_left_are_named_with_the_fix(
    service_conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = service_conf.parent / "state"
    (state / "agent.lock").touch(mode=0o600)  # as root, as an older version did
    rc, err = as_service_user(service_conf, capsys, "status")
    assert rc == 1
    assert f"{state / 'agent.lock'} belongs to uid 0, not to this user (uid {SERVICE_UID})" in err
    assert f"chown -R {SERVICE_UID}:{SERVICE_UID} {state}" in err
    assert "Traceback" not in err
