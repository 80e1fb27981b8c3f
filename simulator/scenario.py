"""Scenario files (TOML): device groups, each with a share of the fleet and a timeline.

Example::

    name = "smoke"
    seed = 7
    duration_s = 10        # the timeline's length; the fleet then drains
    settle_s = 30          # how long to wait for the fleet to drain afterwards

    [[groups]]
    name = "adults"
    share = 0.9
    [[groups.events]]
    at = 0.0
    action = "bind"
    [[groups.events]]
    at = 1.0
    action = "grant"
    purpose = "activation"
    via = "cloud"          # or "local" (the default): the app, or the device's CLI

Each event is the model of its ``action`` (``Event``) and has the keys that action
takes and no other; a key missing, of another action, or misspelt is an error.
Every event has ``at`` and may carry ``jitter_s``: each device of the group does it
at a time drawn uniformly from [at, at + jitter_s], from the scenario's seed.

=================  ==========================================================
action             its other keys (required unless a default is given)
=================  ==========================================================
bind               ``minor`` (default false)
grant, withdraw    ``purpose`` activation|diagnostics; ``via`` local|cloud
policy-version     ``version`` (the device's configured policy changes, P6)
location           ``lat``, ``lon``
precision          ``level`` off|country|region|city; ``via`` local|cloud
crash              ``count`` (crashes captured, default 1), ``text`` (the crash
                   file's text, default a plain crash)
firmware-update    ``version``
unbind             ``via`` local|cloud
factory-reset
account-cancelled  ``via`` local|cloud
suspend, resume    ``via`` cloud only (P13)
replay             ``via`` cloud only: the cloud re-sends the device's latest command
clock              ``shift_s``: the devices' clocks jump forward or back
reboot             the agent restarts: its store reopens, its memory is new
latency            ``ms``, ``for_s``: delay every byte to and from the broker
loss               ``rate`` (0-1), ``for_s``: segments late as if retransmitted
partition          ``for_s``: the group's connections cut and refused
broker-restart     none (the whole fleet's broker; the group is ignored); only a
                   broker the simulator started itself, not with ``--broker``
=================  ==========================================================

``via`` says where a user's choice comes from: ``local`` (the default; the app, or
the device's CLI) or ``cloud`` (a command). The actions done only on the device take
``via = "local"`` at most; the faults and broker-restart, on a group's path to the
broker or on the broker, take no ``via``.
An event that a group cannot carry out (a suspension from the device, a crash from
the cloud, a broker restart with ``--broker``) is an error when the file is loaded,
never a silent refusal. ``outbox_cap`` sets every device's outbox bound.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.config import load_toml
from agent.errors import ConfigError

# Versions and names: visible ASCII only (no spaces, control or non-ASCII characters).
VISIBLE = r"^[\x21-\x7e]+$"
MAX_CRASH_TEXT = 16_384


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- events: one model for each action, told apart by ``action`` -------------------------


class _Event(_Model):
    """What every event has: when it is due, and over how long its group spreads it."""

    at: float = Field(ge=0)
    jitter_s: float = Field(default=0.0, ge=0)


class _OnDevice(_Event):
    """Done on the device only: by its user (the app, the CLI) or to it."""

    via: Literal["local"] = "local"


class _Either(_Event):
    """A choice the user makes on the device (the default) or in the cloud."""

    via: Literal["local", "cloud"] = "local"


class _ByCloud(_Event):
    """Only ever a cloud command."""

    via: Literal["cloud"] = "cloud"


class Bind(_OnDevice):
    """The device is bound to an account (a minor's, with ``minor``)."""

    action: Literal["bind"]
    minor: bool = False


class Grant(_Either):
    """Consent to ``purpose`` is given."""

    action: Literal["grant"]
    purpose: Literal["activation", "diagnostics"]


class Withdraw(_Either):
    """Consent to ``purpose`` is withdrawn."""

    action: Literal["withdraw"]
    purpose: Literal["activation", "diagnostics"]


class PolicyVersion(_OnDevice):
    """The device's configured policy changes (P6)."""

    action: Literal["policy-version"]
    version: str = Field(min_length=1, max_length=64, pattern=VISIBLE)


class Location(_OnDevice):
    """The device learns where it is."""

    action: Literal["location"]
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class Precision(_Either):
    """The location precision the user allows changes."""

    action: Literal["precision"]
    level: Literal["off", "country", "region", "city"]


class Crash(_OnDevice):
    """``count`` crashes are captured, each from a crash file reading ``text`` (hostile
    input for P3, P12) or from a plain one."""

    action: Literal["crash"]
    count: int = Field(default=1, ge=1, le=1000)
    text: str | None = Field(default=None, min_length=1, max_length=MAX_CRASH_TEXT)


class FirmwareUpdate(_OnDevice):
    """The device's firmware is updated to ``version``."""

    action: Literal["firmware-update"]
    version: str = Field(min_length=1, max_length=64, pattern=VISIBLE)


class Unbind(_Either):
    """The device is unbound from its account."""

    action: Literal["unbind"]


class FactoryReset(_OnDevice):
    """The device is reset to factory state."""

    action: Literal["factory-reset"]


class AccountCancelled(_Either):
    """The account the device is bound to is cancelled."""

    action: Literal["account-cancelled"]


class Suspend(_ByCloud):
    """The service suspends collection: its decision, never the device's (P13)."""

    action: Literal["suspend"]


class Resume(_ByCloud):
    """The service resumes collection (P13)."""

    action: Literal["resume"]


class Replay(_ByCloud):
    """The cloud (or an attacker on its path) re-sends the device's latest command."""

    action: Literal["replay"]


class Clock(_OnDevice):
    """The devices' clocks jump forward or back by ``shift_s``."""

    action: Literal["clock"]
    shift_s: float = Field(ge=-90 * 86_400, le=90 * 86_400)


class Reboot(_OnDevice):
    """The agent restarts: its store reopens, its memory is new."""

    action: Literal["reboot"]


class BrokerRestart(_Event):
    """The whole fleet's broker restarts (the group is ignored)."""

    action: Literal["broker-restart"]


class _Fault(_Event):
    """A fault on the group's path to the broker, healed after ``for_s``."""

    for_s: float = Field(gt=0, le=3600)


class Latency(_Fault):
    """Every byte to and from the broker is delayed by ``ms``."""

    action: Literal["latency"]
    ms: float = Field(ge=0, le=10_000)


class Loss(_Fault):
    """A share ``rate`` of segments is late, as if retransmitted."""

    action: Literal["loss"]
    rate: float = Field(ge=0, le=1)


class Partition(_Fault):
    """The group's connections are cut and refused."""

    action: Literal["partition"]


Fault = Latency | Loss | Partition
Event = Annotated[
    Bind
    | Grant
    | Withdraw
    | PolicyVersion
    | Location
    | Precision
    | Crash
    | FirmwareUpdate
    | Unbind
    | FactoryReset
    | AccountCancelled
    | Suspend
    | Resume
    | Replay
    | Clock
    | Reboot
    | BrokerRestart
    | Fault,
    Field(discriminator="action"),
]
"""One step of a group's timeline: the model of its ``action``."""


class Group(_Model):
    """A share of the fleet with one timeline."""

    name: str = Field(min_length=1, max_length=32, pattern=r"^[a-z0-9-]+$")
    share: float = Field(gt=0, le=1)
    policy_version: str = Field(default="1", min_length=1, max_length=64, pattern=VISIBLE)
    events: list[Event] = Field(default_factory=list)


class Scenario(_Model):
    """A whole scenario file."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 1
    duration_s: float = Field(gt=0, le=3600)
    settle_s: float = Field(default=60, gt=0, le=3600)
    outbox_cap: int = Field(default=10_000, ge=1, le=1_000_000)  # per device (P7)
    # The checker's only grace: how late a cloud choice may reach a device, or a message
    # already on the wire the broker (faults add their delay).
    grace_s: float = Field(default=2.0, ge=0, le=60)
    groups: list[Group] = Field(min_length=1)

    @property
    def restarts_broker(self) -> bool:
        """Whether a timeline restarts the broker (only a broker the simulator started)."""
        return any(isinstance(e, BrokerRestart) for g in self.groups for e in g.events)

    @model_validator(mode="after")
    def _shares(self) -> Scenario:
        total = sum(g.share for g in self.groups)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"group shares add up to {total:g}, not 1")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        for i, g in enumerate(self.groups):
            for j, e in enumerate(g.events):
                if e.at + e.jitter_s > self.duration_s:
                    raise ValueError(
                        f"groups.{i}.events.{j} ({e.action}) of group {g.name!r} is due at "
                        f"{e.at + e.jitter_s:g} s, past duration_s = {self.duration_s:g}"
                    )
        return self

    def sizes(self, devices: int) -> list[int]:
        """How many devices each group gets (largest remainder, every group at least 1)."""
        if devices < len(self.groups):
            raise ConfigError(
                f"{devices} devices cannot fill {len(self.groups)} groups", where=self.name
            )
        raw = [g.share * devices for g in self.groups]
        sizes = [max(1, int(r)) for r in raw]
        order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
        i = 0
        while sum(sizes) < devices:
            sizes[order[i % len(order)]] += 1
            i += 1
        while sum(sizes) > devices:
            j = max(range(len(sizes)), key=lambda k: sizes[k])
            sizes[j] -= 1
        return sizes


SHIPPED = Path(__file__).resolve().parent / "scenarios"


def shipped() -> dict[str, Path]:
    """The scenarios that come with the simulator, by name."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.toml"))}


def find_scenario(text: str) -> Path:
    """A scenario file given as a path, or one of the shipped scenarios by name."""
    path = Path(text)
    if path.exists() or path.suffix == ".toml" or "/" in text:
        return path
    found = shipped().get(text)
    if found is None:
        names = ", ".join(shipped())
        raise ConfigError(f"no scenario file or shipped scenario {text!r}; shipped: {names}")
    return found


def describe(path: Path) -> str:
    """The first sentence of a scenario file's leading comment (what it plays), whole."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line.lstrip("#").strip())
    text = " ".join(part for part in block if part)
    sentence = re.match(r"(.+?[.!?])(?:\s|$)", text)
    return sentence.group(1) if sentence else text


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario; ConfigError names the file, the key and the problem."""
    return load_toml(path, Scenario, what="scenario file")
