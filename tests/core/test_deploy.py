"""The Raspberry Pi install agrees with itself: docs/pi.md's commands, the example
configuration, the systemd unit and the tmpfiles entry name the same files, owners
and modes."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = (ROOT / "deploy" / "smartmi-agent.service").read_text()
TMPFILES = (ROOT / "deploy" / "smartmi-agent.tmpfiles").read_text()
EXAMPLE = tomllib.loads((ROOT / "agent.example.toml").read_text())


def install_commands() -> list[list[str]]:
    section = (ROOT / "docs" / "pi.md").read_text()
    block = section[section.index("```sh\n") + 6 : section.index("\n```", section.index("```sh"))]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def installed() -> dict[str, dict[str, str]]:
    """Each file the install commands install: its destination -> source, mode, owner, group."""
    out: dict[str, dict[str, str]] = {}
    for argv in install_commands():
        if not argv or argv[0] != "install" or "-d" in argv:
            continue
        opts = {
            argv[i]: argv[i + 1] for i in range(1, len(argv) - 2) if argv[i] in ("-m", "-o", "-g")
        }
        paths = [a for a in argv[1:] if not a.startswith("-") and a not in opts.values()]
        out[paths[-1]] = {"src": paths[0], **opts}
    return out


def unit(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT, flags=re.MULTILINE)


def test_every_file_the_example_config_names_is_installed_there() -> None:
    files = installed()
    broker = EXAMPLE["broker"]
    for key in ("ca", "cert", "key"):
        assert broker[key] in files, f"[broker] {key} = {broker[key]} is not installed"
    assert files[broker["key"]]["-m"] == "0600"  # the agent refuses a key others can read
    assert files[broker["key"]]["-o"] == unit("User")[0]
    assert files["/etc/smartmi-agent/agent.toml"]["src"] == "agent.example.toml"


def test_the_unit_runs_with_the_installed_config_and_its_documentation_exists() -> None:
    [exec_start] = unit("ExecStart")
    argv = shlex.split(exec_start)
    assert argv[argv.index("--config") + 1] in installed()
    for doc in unit("Documentation"):
        assert doc.removeprefix("file://") in installed()


def test_the_state_socket_and_crash_directories_are_the_units() -> None:
    paths = EXAMPLE["paths"]
    assert paths["state_dir"] == "/var/lib/" + unit("StateDirectory")[0]
    assert Path(paths["socket"]).parent == Path("/run") / unit("RuntimeDirectory")[0]
    crash = paths["crash_dir"]
    assert f"-{crash}" in unit("ReadWritePaths") or crash in unit("ReadWritePaths")
    entries = {
        f[1]: f for f in (line.split() for line in TMPFILES.splitlines()) if f and f[0] == "d"
    }
    assert entries[crash][2:5] == ["1733", unit("User")[0], unit("Group")[0]]
    assert (
        installed()["/etc/tmpfiles.d/smartmi-agent.conf"]["src"] == "deploy/smartmi-agent.tmpfiles"
    )


def test_the_service_user_is_the_one_the_readme_creates() -> None:
    [useradd] = [argv for argv in install_commands() if argv and argv[0] == "useradd"]
    assert useradd[-1] == unit("User")[0]
