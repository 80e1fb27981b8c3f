"""Scenario files: the shipped ones load; bad ones get errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from simulator.scenario import load_scenario

SHIPPED = sorted((Path(__file__).parents[2] / "simulator" / "scenarios").glob("*.toml"))
GOOD = """
name = "t"
duration_s = 5
[[groups]]
name = "a"
share = 1.0
events = [{ at = 0.0, action = "bind" }]
"""


def test_the_shipped_scenarios_load() -> None:
    names = {load_scenario(p).name for p in SHIPPED}
    assert names >= {
        "smoke",
        "consent-churn",
        "offline-then-wipe",
        "broker-restart",
        "mixed",
        "offline-withdraw-regrant",
        "offline-off-city",
        "offline-suspend-resume",
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('action = "bind"', 'action = "explode"'), "groups.0.events.0.action"),
        (('action = "bind"', 'action = "bnid"'), "'replay' (did you mean 'bind'?)"),
        (('action = "bind"', 'action = "grant"'), "action 'grant' needs purpose"),
        (("share = 1.0", "share = 0.5"), "group shares add up to 0.5"),
        (("at = 0.0", "at = 9.0"), "past duration_s"),
        (('name = "a"', 'name = "a"\ncolour = "red"'), "groups.0.colour: Extra inputs"),
        (("duration_s = 5", "duration_s = "), "not valid TOML"),
        (('action = "bind"', 'action = "bind", via = "cloud"'), "cannot come from the cloud"),
        (('name = "t"', 'name = "t\\u0000x"'), "name: String should match pattern"),
        (("share = 1.0", 'share = 1.0\npolicy_version = "v 1"'), "groups.0.policy_version"),
        (
            ('action = "bind"', 'action = "firmware-update", version = "2.0\\u202e"'),
            "groups.0.events.0.version",
        ),
    ],
)
def test_bad_scenarios_name_the_problem(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_a_scenario_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_bytes(GOOD.replace('name = "a"', 'name = "a\xff"').encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot read: 'utf-8' codec") as err:
        load_scenario(path)
    assert str(path) in str(err.value)


def test_sizes_follow_shares(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        GOOD.replace("share = 1.0", "share = 0.7") + '[[groups]]\nname = "b"\nshare = 0.3\n'
    )
    scenario = load_scenario(path)
    assert scenario.sizes(10) == [7, 3]
    assert sum(scenario.sizes(999)) == 999
    with pytest.raises(ConfigError, match="cannot fill"):
        scenario.sizes(1)


def test_shipped_scenarios_are_listed_and_found_by_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from simulator.cli import main
    from simulator.scenario import describe, find_scenario, shipped

    assert main(["scenarios"]) == 0
    listed = capsys.readouterr().out.splitlines()
    for name in shipped():
        assert any(line.startswith(f"{name} ") for line in listed), name
    assert find_scenario("smoke").name == "smoke.toml"
    for path in shipped().values():  # a whole sentence, never cut where a line of the file ends
        assert describe(path).endswith((".", "!", "?")), path.name
    with pytest.raises(ConfigError, match="shipped: broker-restart, clock-skew"):
        find_scenario("smok")


def test_validate_checks_a_file_and_how_devices_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulator.cli import main

    assert main(["validate", "smoke", "--devices", "10"]) == 0
    out = capsys.readouterr().out
    assert "scenario 'smoke' is valid: 3 groups" in out
    assert "with 10 devices: adults 8, leavers 1, children 1" in out
    assert main(["validate", "smoke", "--devices", "1"]) == 1
    assert "1 devices cannot fill 3 groups" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\nduration_s = 5\n[[groups]]\nname = "g"\nshare = 1.0\n'
        'events = [{ at = 0.0, action = "grant" }]\n'
    )
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "needs purpose" in err
    assert "Traceback" not in err


def test_too_few_devices_are_refused_before_a_broker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulator.cli import main

    rc = main(
        ["--dir", str(tmp_path / "dev"), "run", "--devices", "1", "--scenario", "smoke",
         "--report", str(tmp_path / "r.json")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 devices cannot fill 3 groups" in err
    assert "started Mosquitto" not in err
    assert not (tmp_path / "dev").exists()  # nothing generated, nothing started
