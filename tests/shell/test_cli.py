"""The agent's configuration errors and CLI verbs acting on a state directory."""

from __future__ import annotations

import importlib.metadata
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.errors import ConfigError, StoreLocked
from agent.store.statedir import locked
from simulator.cli import main as sim_main
from tests.shell.conftest import GOOD


def run(conf: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, object]:
    rc = main(["--config", str(conf), "--json", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else err)


def test_relative_paths_follow_the_config_file(conf: Path) -> None:
    config = load_config(conf)
    assert config.state_dir == conf.parent / "state"
    assert config.broker is not None
    assert config.broker.ca == conf.parent / "pki" / "ca.pem"
    assert (config.broker.host, config.broker.port) == ("127.0.0.1", 8883)
    assert config.broker.endpoints == (("127.0.0.1", 8883),)


def test_fallback_urls_follow_the_url(conf: Path) -> None:
    conf.write_text(
        GOOD.replace(
            'url = "mqtts://127.0.0.1:8883"',
            'url = "mqtts://n1:8883"\nfallback_urls = ["mqtts://n2:18883", "mqtts://n3"]',
        )
    )
    broker = load_config(conf).broker
    assert broker is not None
    assert broker.endpoints == (("n1", 8883), ("n2", 18883), ("n3", 8883))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("mqtts://", "mqtt://"), "broker.url: 'mqtt://127.0.0.1:8883' must be an mqtts:// URL"),
        (
            (
                'url = "mqtts://127.0.0.1:8883"',
                'url = "mqtts://a:1"\nfallback_urls = ["mqtt://b:2"]',
            ),
            "broker.fallback_urls: 'mqtt://b:2' must be an mqtts:// URL",
        ),
        (('id = "cli-1"', 'id = "a/b"'), "device.id: it contains '/'"),
        (
            ('policy_version = "7"', 'policy_version = "7"\nextra = 1'),
            "privacy.extra: Extra inputs",
        ),
        (('serial = "SN1"\n', ""), "device.serial: Field required"),
        (("[paths]", "[paths"), "not valid TOML"),
        (
            ('state_dir = "state"', 'state_dri = "state"'),
            "paths.state_dri: Extra inputs are not permitted (did you mean 'state_dir'?)",
        ),
        (
            ('key = "pki/dev.key"', 'key = "pki/dev.key"\nprotocol = "v55"'),
            "broker.protocol: Input should be 'v5' or 'v311' (did you mean 'v5'?)",
        ),
    ],
)
def test_config_errors_name_the_key(conf: Path, edit: tuple[str, str], message: str) -> None:
    conf.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert message in str(info.value)
    assert str(conf) in str(info.value)


def test_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run(tmp_path / "nope.toml", "status", capsys=capsys)
    assert rc == 1
    assert "nope.toml: file not found" in str(err)


def test_verbs_that_only_read_never_make_a_state(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status and export on a state directory that is not there (a mistyped state_dir)
    say where they looked, exit 1 and create nothing; nor on one without a store."""
    state = conf.parent / "state"
    for verb in ("status", "export"):
        rc, err = run(conf, verb, capsys=capsys)
        assert rc == 1
        assert f"the state directory {state} does not exist: check paths.state_dir" in str(err)
        assert not state.exists()
    state.mkdir(mode=0o700)
    rc, err = run(conf, "status", capsys=capsys)
    assert rc == 1
    assert "holds no agent state (state.db)" in str(err)
    assert list(state.iterdir()) == []


def test_verbs_print_text_for_people_and_the_same_data_as_json(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def text(*argv: str) -> list[str]:
        assert main(["--config", str(conf), *argv]) == 0
        return capsys.readouterr().out.splitlines()

    assert text("bind", "--binding-id", "B1") == ["bound to B1; lifecycle activation-due"]
    assert text("consent", "grant", "diagnostics") == ["diagnostics granted; in force"]
    assert text("location", "set", "48.8566", "2.3522") == [
        "location stored at region precision: 48.9, 2.4"
    ]
    [queued] = text("crash", "--simulate")
    assert queued.startswith("crash diagnostics queued as ")
    status = text("status")
    state = conf.parent / "state"
    assert status[0] == (
        f"daemon      not running (no answer at {state / 'control.sock'}); read from {state}"
    )
    assert "consent     activation not-granted, diagnostics ok" in status
    assert "outbox      1 queued, 0 in flight; dropped: none" in status
    assert text("consent", "withdraw", "diagnostics") == [
        "diagnostics withdrawn; 1 queued item of it deleted"
    ]
    export = text("export")
    assert export[0] == "2 ledger entries (--json or -o FILE for every field)"
    assert re.fullmatch(
        r"  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z  consent grant diagnostics", export[1]
    )
    assert main(["--config", str(conf), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queued"] == 0


def test_status_names_certificate_and_key_problems_as_doctor_does(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def status(*flags: str) -> tuple[int, str]:
        rc = main(["--config", str(conf), "status", *flags])
        return rc, capsys.readouterr().out

    assert run(conf, "location", "precision", "city", capsys=capsys)[0] == 0  # a state
    rc, out = status("--json")
    assert (rc, json.loads(out)["identity"]) == (0, [])
    cert, key = conf.parent / "pki" / "dev.pem", conf.parent / "pki" / "dev.key"
    good = cert.read_bytes()
    cert.unlink()
    rc, out = status()
    assert rc == 1
    assert f"identity    FAIL certificate: {cert} does not exist" in out
    cert.write_bytes(good)
    key.chmod(0o644)  # readable by every user
    rc, out = status("--json")
    assert rc == 1
    [problem] = json.loads(out)["identity"]
    assert problem["level"] == "FAIL"
    assert str(key) in problem["detail"]
    assert problem["fix"]


def test_log_lines_as_text_or_json_with_iso_times(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(conf), "bind", "--binding-id", "B1"]) == 0
    argv = ["--config", str(conf), "--log-level", "info", "consent", "grant", "diagnostics"]
    assert main([*argv[:2], "--log-format", "text", *argv[2:]]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "consent granted" in x]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info    smartmi\.device: consent granted "
        r"\(.*purpose=diagnostics.*\)",
        lines[0],
    )
    assert main([*argv[:2], "--log-format", "json", *argv[2:]]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    doc = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])


def test_verbs_end_to_end(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run(conf, "crash", "--simulate", capsys=capsys)
    assert rc == 1
    assert "not-bound" in str(err)
    rc, out = run(conf, "status", capsys=capsys)
    assert rc == 0
    assert isinstance(out, dict)
    assert out["lifecycle"] == "factory-new"
    assert run(conf, "location", "precision", "country", capsys=capsys)[0] == 0
    rc, out = run(conf, "location", "set", "48.8566", "2.3522", capsys=capsys)
    assert out == {"stored": {"lat": 49.0, "lon": 2.0, "precision": "country"}}
    assert run(conf, "bind", "--binding-id", "B1", capsys=capsys)[0] == 0
    assert run(conf, "consent", "grant", "diagnostics", capsys=capsys)[0] == 0
    rc, out = run(conf, "crash", "--simulate", capsys=capsys)
    assert rc == 0
    rc, out = run(conf, "status", capsys=capsys)
    assert isinstance(out, dict)
    assert out["queued"] == 1
    assert out["consent"] == {"activation": "not-granted", "diagnostics": "ok"}
    rc, out = run(conf, "consent", "withdraw", "diagnostics", capsys=capsys)
    assert out == {"withdrawn": "diagnostics", "pending_items_deleted": 1}
    rc, out = run(conf, "export", capsys=capsys)
    assert isinstance(out, dict)
    assert [e["action"] for e in out["entries"]] == ["grant", "withdraw"]
    rc, out = run(conf, "unbind", capsys=capsys)
    assert isinstance(out, dict)
    assert out["deletion_request"]
    rc, out = run(conf, "status", capsys=capsys)
    assert isinstance(out, dict)
    assert (out["lifecycle"], out["deletion_requests_pending"]) == ("factory-new", 1)


def test_bad_arguments_are_refused(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--config", str(conf), "consent", "grant", "marketing"])
    assert "unknown purpose 'marketing'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(conf), "location", "precision", "street"])
    assert "off, country, region, city" in capsys.readouterr().err
    rc, err = run(conf, "location", "set", "95", "0", capsys=capsys)
    assert rc == 1
    assert "latitude 95.0 is outside" in str(err)


def test_locked_state_dir(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with locked(conf.parent / "state"):
        with pytest.raises(StoreLocked), locked(conf.parent / "state"):
            pass
        rc, err = run(conf, "status", capsys=capsys)
    assert rc == 1
    assert "holds" in str(err)


def test_the_daemon_waits_for_a_verb_to_let_the_state_dir_go(conf: Path) -> None:
    """The daemon starting while a verb holds the lock waits for it (up to its wait),
    and gives up with the same clear error when it is held for longer."""
    state = conf.parent / "state"
    held = threading.Event()
    release = threading.Event()

    def verb() -> None:
        with locked(state):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=verb)
    thread.start()
    try:
        assert held.wait(10)
        with (
            pytest.raises(StoreLocked, match=r"holds .* \(waited 0.2 s\)"),
            locked(state, wait_s=0.2),
        ):
            pass
        threading.Timer(0.3, release.set).start()  # the verb is done 0.3 s from now
        started = time.monotonic()
        with locked(state, wait_s=5.0):
            waited = time.monotonic() - started
        assert 0.2 < waited < 5.0
    finally:
        release.set()
        thread.join()


def test_a_socket_left_by_a_dead_daemon_falls_back_to_the_state_dir(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(conf, "location", "precision", "region", capsys=capsys)[0] == 0  # a state
    sock_path = conf.parent / "state" / "control.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(sock_path))  # bound, never listening, then closed: the file stays
    assert sock_path.exists()
    rc, out = run(conf, "status", capsys=capsys)
    assert rc == 0
    assert isinstance(out, dict)
    assert out["lifecycle"] == "factory-new"


@pytest.mark.parametrize("tool", ["smartmi-agent", "smartmi-sim"])
def test_both_tools_say_their_version(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    entry = main if tool == "smartmi-agent" else sim_main
    with pytest.raises(SystemExit) as done:
        entry(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"{tool} {importlib.metadata.version('smartmi-agent')}"


def test_the_config_may_follow_the_verb(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["location", "precision", "city", "--config", str(conf)]) == 0
    capsys.readouterr()
    assert main(["status", "--config", str(conf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device_id"] == "cli-1"


def test_a_closed_pipe_ends_quietly(conf: Path) -> None:
    # smartmi-agent status | head -1: the reader goes away; no traceback, exit 141.
    import subprocess
    import sys

    assert main(["--config", str(conf), "location", "precision", "city"]) == 0  # a state
    cmd = [sys.executable, "-m", "agent.cli", "--config", str(conf), "export"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(30)
    assert b"Traceback" not in err
    assert b"BrokenPipe" not in err


def test_verbs_say_what_actually_happened(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(conf, "bind", "--binding-id", "kid-1", "--minor", capsys=capsys)[0] == 0
    rc, out = run(conf, "consent", "grant", "diagnostics", capsys=capsys)
    assert rc == 0
    assert out == {
        "granted": "diagnostics",
        "changed": True,
        "in_force": False,
        "not_in_force_because": "the binding is a minor's: no personal data at all (P5)",
    }
    assert run(conf, "unbind", capsys=capsys)[0] == 0
    assert run(conf, "bind", "--binding-id", "adult-1", capsys=capsys)[0] == 0
    rc, out = run(conf, "consent", "grant", "diagnostics", capsys=capsys)
    assert out == {"granted": "diagnostics", "changed": True, "in_force": True}
    assert run(conf, "location", "precision", "off", capsys=capsys)[0] == 0
    rc, out = run(conf, "location", "set", "48.8566", "2.3522", capsys=capsys)
    assert rc == 0
    assert out == {"stored": None, "why": "location precision is off: nothing is stored"}


def test_log_level_gives_json_lines_of_what_happened(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(conf), "bind", "--binding-id", "B9"]) == 0
    capsys.readouterr()
    assert (
        main(["consent", "grant", "diagnostics", "--config", str(conf), "--log-level", "info"]) == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    granted = [x for x in lines if x["msg"] == "consent granted"]
    assert granted
    assert granted[0]["purpose"] == "diagnostics"
    assert granted[0]["level"] == "info"
    # At the verbs' default (warning) the same action logs nothing; it only says that it
    # acted on the state directory, as no daemon runs.
    assert main(["--config", str(conf), "consent", "withdraw", "diagnostics"]) == 0
    state = conf.parent / "state"
    assert capsys.readouterr().err == (
        f"smartmi-agent: no daemon answered at {state / 'control.sock'}; acting on the "
        f"state directory {state} directly\n"
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{tmp}/nonexistent-dir/x.json", "the folder {tmp}/nonexistent-dir does not exist"),
        ("{tmp}", "{tmp} is a directory; give a file name"),
    ],
)
def test_export_to_a_bad_path_is_named(
    conf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    assert run(conf, "location", "precision", "city", capsys=capsys)[0] == 0  # a state
    rc, err = run(conf, "export", "-o", target.format(tmp=tmp_path), capsys=capsys)
    assert rc == 1
    assert message.format(tmp=tmp_path) in str(err)
    assert "Traceback" not in str(err)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["consent", "grant", "activaton"],
            "unknown purpose 'activaton' (did you mean 'activation'?)",
        ),
        (
            ["location", "precision", "cty"],
            "unknown location precision 'cty' (did you mean 'city'?)",
        ),
        (["consent", "grant", "xyz"], "unknown purpose 'xyz'; use one of activation, diagnostics"),
    ],
)
def test_a_mistyped_choice_gets_the_closest_one(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert said in capsys.readouterr().err
