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

Actions and their keys:

=================  ==========================================================
bind               ``minor`` (bool)
grant, withdraw    ``purpose``; ``via`` local (default) or cloud
policy-version     ``version`` (the device's configured policy changes, P6)
location           ``lat``, ``lon``
precision          ``level`` off|country|region|city; ``via`` local|cloud
crash              ``count`` (crashes captured, default 1), ``text`` (the crash file's text)
firmware-update    ``version``
unbind             ``via`` local|cloud
factory-reset
account-cancelled  ``via`` local|cloud
suspend, resume    by cloud command only (P13)
latency            ``ms``, ``for_s``: delay every byte to and from the broker
loss               ``rate`` (0-1), ``for_s``: segments late as if retransmitted
partition          ``for_s``: the group's connections cut and refused
broker-restart     (the whole fleet's broker; the group is ignored); only a
                   broker the simulator started itself, not with ``--broker``
reboot             the agent restarts: its store reopens, its memory is new
clock              ``shift_s``: the devices' clocks jump forward or back
replay             the cloud re-sends the device's latest command (a replay)
=================  ==========================================================

An event that a group cannot carry out (a suspension from the device, a crash
from the cloud, a broker restart with ``--broker``) is an error when the file is
loaded, never a silent refusal. ``outbox_cap`` sets every device's outbox bound.

Every event may carry ``jitter_s``: each device of the group does it at a time
drawn uniformly from [at, at + jitter_s], from the scenario's seed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.config import load_toml
from agent.errors import ConfigError

Action = Literal[
    "bind",
    "grant",
    "withdraw",
    "policy-version",
    "location",
    "precision",
    "crash",
    "firmware-update",
    "unbind",
    "factory-reset",
    "account-cancelled",
    "suspend",
    "resume",
    "latency",
    "loss",
    "partition",
    "broker-restart",
    "reboot",
    "clock",
    "replay",
]

# Versions and names: visible ASCII only (no spaces, control or non-ASCII characters).
VISIBLE = r"^[\x21-\x7e]+$"

_NEEDS: dict[str, tuple[str, ...]] = {
    "grant": ("purpose",),
    "withdraw": ("purpose",),
    "policy-version": ("version",),
    "location": ("lat", "lon"),
    "precision": ("level",),
    "firmware-update": ("version",),
    "latency": ("ms", "for_s"),
    "loss": ("rate", "for_s"),
    "partition": ("for_s",),
    "clock": ("shift_s",),
}
FAULTS = frozenset({"latency", "loss", "partition"})
# Where each action can come from; the first is the default.
_SOURCES: dict[str, tuple[str, ...]] = {
    "grant": ("local", "cloud"),
    "withdraw": ("local", "cloud"),
    "precision": ("local", "cloud"),
    "unbind": ("local", "cloud"),
    "account-cancelled": ("local", "cloud"),
    "suspend": ("cloud",),  # P13: the service's decision, never the device's
    "resume": ("cloud",),
    "replay": ("cloud",),  # the cloud (or an attacker on its path) re-sends a command
}
MAX_CRASH_TEXT = 16_384


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(_Model):
    """One step of a group's timeline."""

    at: float = Field(ge=0)
    action: Action
    jitter_s: float = Field(default=0.0, ge=0)
    via: Literal["local", "cloud"] | None = None  # default: see _SOURCES
    purpose: Literal["activation", "diagnostics"] | None = None
    minor: bool = False
    version: str | None = Field(default=None, min_length=1, max_length=64, pattern=VISIBLE)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    level: Literal["off", "country", "region", "city"] | None = None
    count: int = Field(default=1, ge=1, le=1000)
    ms: float | None = Field(default=None, ge=0, le=10_000)
    rate: float | None = Field(default=None, ge=0, le=1)
    for_s: float | None = Field(default=None, gt=0, le=3600)
    shift_s: float | None = Field(default=None, ge=-90 * 86_400, le=90 * 86_400)
    # Crash text as another process would write it (hostile input for P3, P12).
    text: str | None = Field(default=None, min_length=1, max_length=MAX_CRASH_TEXT)

    @model_validator(mode="after")
    def _required(self) -> Event:
        missing = [k for k in _NEEDS.get(self.action, ()) if getattr(self, k) is None]
        if missing:
            raise ValueError(f"action {self.action!r} needs {', '.join(missing)}")
        sources = _SOURCES.get(self.action, ("local",))
        if self.via is not None and self.via not in sources:
            raise ValueError(
                f"action {self.action!r} cannot come from the {self.via}: "
                f"use via = {' or '.join(repr(v) for v in sources)}"
            )
        if self.text is not None and self.action != "crash":
            raise ValueError("only a crash carries text")
        return self

    @property
    def source(self) -> Literal["local", "cloud"]:
        """Where the event comes from (``via``, or the action's default)."""
        return self.via or (
            "cloud" if _SOURCES.get(self.action, ("local",))[0] == "cloud" else "local"
        )


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
        return any(e.action == "broker-restart" for g in self.groups for e in g.events)

    @model_validator(mode="after")
    def _shares(self) -> Scenario:
        total = sum(g.share for g in self.groups)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"group shares add up to {total:g}, not 1")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        for g in self.groups:
            for e in g.events:
                if e.at + e.jitter_s > self.duration_s:
                    raise ValueError(
                        f"group {g.name!r}: an event at {e.at + e.jitter_s:g} s is past "
                        f"duration_s = {self.duration_s:g}"
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
