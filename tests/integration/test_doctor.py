"""``smartmi-agent doctor`` against a real broker: each problem named with its fix."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
from pathlib import Path

import pytest

from agent.cli import main
from agent.runtime.doctor import FAIL, OK, Finding, diagnose
from simulator.broker import MosquittoBroker
from simulator.pki import DevPki

DEVICE = "doctor-1"


def write_config(root: Path, *, url: str, ca: Path, cert: Path, key: Path) -> Path:
    path = root / "agent.toml"
    path.write_text(
        f"""
[device]
id = "{DEVICE}"
serial = "SN-DR"
model = "smartmi.fan.za5"
firmware_version = "1.0"

[privacy]
policy_version = "1"

[paths]
state_dir = "state"
socket = "state/control.sock"

[broker]
url = "{url}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"""
    )
    return path


def own_files(root: Path, pki: DevPki, device: str = DEVICE) -> tuple[Path, Path]:
    """A private copy of a device's certificate and key, to damage freely."""
    ident = pki.ensure_devices([device])[device]
    cert, key = root / "device.pem", root / "device.key"
    shutil.copy(ident.cert, cert)
    shutil.copy(ident.key, key)
    key.chmod(0o600)
    return cert, key


def sound_install(root: Path, broker: MosquittoBroker, pki: DevPki) -> Path:
    """A config that passes every check: the device's own files, the broker's CA."""
    cert, key = own_files(root, pki)
    return write_config(root, url=broker.url, ca=pki.ca_cert, cert=cert, key=key)


def by_check(findings: list[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in findings:
        out.setdefault(f.check, []).append(f)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_sound_install_passes_every_check(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = sound_install(tmp_path, broker, pki)
    assert main(["doctor", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "everything checked is fine" in out
    assert f"127.0.0.1:{broker.port}: mutual TLS" in out
    assert not (tmp_path / "state").exists()  # doctor changes nothing


def test_each_problem_is_named_with_its_fix(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = own_files(tmp_path, pki, "someone-else")
    key.chmod(0o640)
    port = free_port()
    conf = write_config(
        tmp_path, url=f"mqtts://127.0.0.1:{port}", ca=pki.ca_cert, cert=cert, key=key
    )
    assert main(["doctor", "--json", "--config", str(conf)]) == 1
    found = {f["check"]: f for f in json.loads(capsys.readouterr().out)}
    assert found["identity"]["level"] == FAIL
    assert "mode 0640, open to other users" in found["identity"]["detail"]
    assert found["identity"]["fix"] == f"chmod 600 {key}"
    assert found["broker"]["level"] == FAIL
    assert found["broker"]["fix"] == "fix the files above first"
    key.chmod(0o600)
    again = by_check(diagnose(conf))
    assert "is the certificate of 'someone-else', but [device] id is 'doctor-1'" in (
        again["identity"][0].detail
    )
    [refused] = again["broker"]
    assert f"127.0.0.1:{port}: connection refused" in refused.detail
    assert refused.fix == "start the broker, or correct [broker] url"


def test_a_foreign_ca_and_a_foreign_client_certificate_are_told_apart(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki, foreign_pki: DevPki
) -> None:
    cert, key = own_files(tmp_path, pki)
    conf = write_config(tmp_path, url=broker.url, ca=foreign_pki.ca_cert, cert=cert, key=key)
    found = by_check(diagnose(conf))
    [handshake] = found["broker"]
    assert handshake.level == FAIL
    assert "unknown-ca" in handshake.detail
    assert "[broker] ca is not the CA" in handshake.fix
    assert any("was not issued by the CA" in f.detail for f in found["certificate"])

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    cert, key = own_files(theirs, foreign_pki)
    conf = write_config(theirs, url=broker.url, ca=pki.ca_cert, cert=cert, key=key)
    [handshake] = by_check(diagnose(conf))["broker"]
    assert handshake.level == FAIL, handshake
    assert "issue it from the broker's CA" in handshake.fix


def test_a_clock_before_the_certificate_is_named(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    conf = sound_install(tmp_path, broker, pki)
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp()
    found = by_check(diagnose(conf, now=past))
    [leaf] = found["certificate"]
    assert leaf.level == FAIL
    assert "this machine's clock says 2020-01-01 00:00 UTC" in leaf.detail
    assert "timedatectl set-ntp true" in leaf.fix
    assert [f.level for f in found["identity"]] == [OK]


def test_an_unreadable_config_is_one_finding_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--config", str(tmp_path / "nope.toml")]) == 1
    captured = capsys.readouterr()
    assert "FAIL  config  " in captured.out
    assert "nope.toml: file not found" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_a_state_directory_to_be_made_inside_missing_folders_is_fine(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    conf = sound_install(tmp_path, broker, pki)
    conf.write_text(conf.read_text().replace('state_dir = "state"', 'state_dir = "a/b/state"'))
    [state] = by_check(diagnose(conf))["state"]
    assert state.level == OK, state
    assert "does not exist yet; the agent makes it 0700" in state.detail


def test_a_key_directory_others_can_write_is_named(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki
) -> None:
    conf = sound_install(tmp_path, broker, pki)
    (tmp_path / "state" / "keys").mkdir(parents=True, mode=0o700)
    (tmp_path / "state").chmod(0o700)
    (tmp_path / "state" / "keys").chmod(0o777)
    [state] = by_check(diagnose(conf))["state"]
    assert state.level == FAIL
    assert "(the data key directory) has mode 0777" in state.detail
    assert state.fix == f"chmod 700 {tmp_path / 'state' / 'keys'}"
