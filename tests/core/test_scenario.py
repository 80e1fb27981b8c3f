"""Scenario files: the shipped ones load; bad ones get errors that name the key."""

from __future__ import annotations

import json
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from simulator.scenario import Event, load_scenario

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
        (
            ('action = "bind"', 'action = "explode"'),
            "groups.0.events.0.action: 'explode' is not one of 'bind'",
        ),
        (('action = "bind"', 'action = "bnid"'), "'partition' (did you mean 'bind'?)"),
        (('action = "bind"', 'action = "grant"'), "events.0 (grant): purpose: Field required"),
        (("share = 1.0", "share = 0.5"), "group shares add up to 0.5"),
        (("at = 0.0", "at = 9.0"), "groups.0.events.0 (bind) of group 'a' is due at 9 s, past"),
        (('name = "a"', 'name = "a"\ncolour = "red"'), "groups.0.colour: Extra inputs"),
        (("duration_s = 5", "duration_s = "), "not valid TOML"),
        (('action = "bind"', 'action = "bind", via = "cloud"'), "via: Input should be 'local'"),
        (('action = "bind"', 'action = "suspend", via = "local"'), "via: Input should be 'cloud'"),
        (('action = "bind"', 'action = "bind", text = "x"'), "(bind): text: Extra inputs"),
        (('name = "t"', 'name = "t\\u0000x"'), "name: String should match pattern"),
        (("share = 1.0", 'share = 1.0\npolicy_version = "v 1"'), "groups.0.policy_version"),
        (
            ('action = "bind"', 'action = "firmware-update", version = "2.0\\u202e"'),
            "groups.0.events.0 (firmware-update): version: String should match",
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
    assert "groups.0.events.0 (grant): purpose: Field required" in err
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


# -- events: one model for each action; an event made bad in one way, anywhere, is named.

MODELS: dict[str, Any] = {
    typing.get_args(m.model_fields["action"].annotation)[0]: m
    for m in typing.get_args(typing.get_args(Event)[0])
}
KEYS = {action: set(m.model_fields) for action, m in MODELS.items()}
# A valid value for each key some action requires.
SAMPLE: dict[str, Any] = {
    "at": 0.5, "purpose": "activation", "version": "2.0.1", "lat": 48.1, "lon": 11.5,
    "level": "city", "ms": 50, "rate": 0.1, "for_s": 1.0, "shift_s": 60.0,
}  # fmt: skip


def _required(action: str) -> list[str]:
    return [k for k, f in MODELS[action].model_fields.items() if f.is_required()]


def _minimal(action: str) -> dict[str, Any]:
    """An event of ``action`` with the keys it requires and no other."""
    return {k: action if k == "action" else SAMPLE[k] for k in _required(action)}


def _scenario(events: list[dict[str, Any]]) -> str:
    tables = ", ".join(
        "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in e.items()) + " }" for e in events
    )
    return f'name = "t"\nduration_s = 5\n[[groups]]\nname = "a"\nshare = 1.0\nevents = [{tables}]\n'


def test_every_action_has_a_model_that_requires_at_and_action() -> None:
    assert len(MODELS) == 20
    for action in MODELS:
        assert {"at", "action"} <= set(_required(action)) <= {"action", *SAMPLE}
    # SAMPLE is the file format's required keys: each of them is some action's.
    assert {k for a in MODELS for k in _required(a)} == {"action", *SAMPLE}


@st.composite
def bad_events(draw: st.DrawFn) -> tuple[list[dict[str, Any]], str, str]:
    """Valid events with one made bad: the events, how, and what the error names."""
    actions = draw(st.lists(st.sampled_from(sorted(MODELS)), min_size=1, max_size=8))
    events = [_minimal(a) for a in actions]
    i = draw(st.integers(0, len(events) - 1))
    action = events[i]["action"]
    ways = ["unknown", "foreign"] + ["missing"] * (len(_required(action)) > 2)
    way = draw(st.sampled_from(ways))
    if way == "unknown":
        events[i]["action"] = unknown = draw(
            st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1).filter(lambda a: a not in MODELS)
        )
        return events, way, f"groups.0.events.{i}.action: {unknown!r} is not one of 'bind'"
    if way == "missing":
        key = draw(st.sampled_from([k for k in _required(action) if k not in ("at", "action")]))
        del events[i][key]
        return events, way, f"groups.0.events.{i} ({action}): {key}: Field required"
    key = draw(st.sampled_from(sorted(set().union(*KEYS.values()) - KEYS[action])))
    events[i][key] = SAMPLE.get(key, True)  # any value: the key itself is wrong here
    return events, way, f"groups.0.events.{i} ({action}): {key}: Extra inputs are not"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(MODELS)), min_size=1, max_size=8))
def test_each_action_loads_with_its_required_keys_as_its_model(actions: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.toml"
        path.write_text(_scenario([_minimal(a) for a in actions]))
        events = load_scenario(path).groups[0].events
    assert [type(e) for e in events] == [MODELS[a] for a in actions]


@settings(max_examples=300, deadline=None)
@given(bad_events())
def test_a_bad_event_is_named_by_file_index_action_and_key(
    case: tuple[list[dict[str, Any]], str, str],
) -> None:
    events, way, named = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.toml"
        path.write_text(_scenario(events))
        with pytest.raises(ConfigError) as err:
            load_scenario(path)
    assert str(err.value).startswith(f"{path}: {named}")
    assert "; " not in str(err.value)  # one mistake, one problem
    if way == "foreign":  # said to be another action's key, not taken for a misspelt one
        assert " it, not this one: its keys are at, jitter_s, " in str(err.value)


@pytest.mark.parametrize(
    ("event", "named"),
    [
        ({"at": 0.5, "action": "suspnd"}, "groups.0.events.1.action: 'suspnd' is not one of"),
        (
            {"at": 0.5, "action": "location", "lat": 1.0},
            "groups.0.events.1 (location): lon: Field required",
        ),
        (
            {"at": 0.5, "action": "partition", "for_s": 1, "purpose": "activation"},
            "groups.0.events.1 (partition): purpose: Extra inputs are not permitted (grant, "
            "withdraw take it, not this one: its keys are at, jitter_s, for_s, action)",
        ),
    ],
)
@pytest.mark.parametrize("verb", ["validate", "run"])
def test_the_cli_names_a_bad_event_without_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    verb: str,
    event: dict[str, Any],
    named: str,
) -> None:
    from simulator.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(_scenario([{"at": 0.0, "action": "bind"}, event]))
    args = ["--devices", "2", "--scenario", str(bad)] if verb == "run" else [str(bad)]
    assert main(["--dir", str(tmp_path / "dev"), verb, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"smartmi-sim: error: {bad}: {named}")
    assert "Traceback" not in err
    assert not (tmp_path / "dev").exists()  # refused before anything was made or started
