"""The device's records, as the rules see them: configuration, settings, control.

``Settings`` is personal and sealed under the data key, so a wipe destroys it with
the key (P9). ``Control`` is not personal and sealed under the system key, which
survives wipes: the suspension (P13 lasts until the cloud resumes collection,
across unbind, rebind, wipes and restarts), the memory of cloud commands taken,
and the device clock's offset from the cloud's (SPEC §3).

Pure: records and their JSON forms only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.commands import Memory
from agent.core.consent import ConsentState, Grant
from agent.core.identity import validate_device_id
from agent.core.lifecycle import State
from agent.core.location import DEFAULT_PRECISION, CoarseLocation, Precision
from agent.core.ordering import Clock, Stamp
from agent.core.purposes import Purpose
from agent.errors import SchemaError


@dataclass(frozen=True, slots=True)
class Control:
    """What survives wipes: suspension and its stamp, commands taken, the clock's offset."""

    suspended: bool = False
    suspension: Stamp | None = None
    memory: Memory = field(default_factory=Memory)
    clock: Clock | None = None

    def to_json(self) -> dict[str, Any]:
        """As sealed under the system key."""
        return {
            "suspended": self.suspended,
            "suspension": None if self.suspension is None else self.suspension.to_json(),
            "seen": dict(self.memory.seen),
            "clock": None if self.clock is None else self.clock.to_json(),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Control:
        """As read back."""
        return cls(
            suspended=bool(raw.get("suspended", False)),
            suspension=Stamp.from_json(raw.get("suspension")),
            memory=Memory({str(k): float(v) for k, v in raw.get("seen", {}).items()}),
            clock=Clock.from_json(raw.get("clock")),
        )

    @classmethod
    def unreadable(cls) -> Control:
        """A control record that failed to open: suspended until the cloud resumes
        (fail closed, P13), with no memory of commands and no known clock."""
        return cls(suspended=True)


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What the rules need to know about the device and the policy."""

    device_id: str
    serial: str
    model: str
    firmware_version: str
    policy_version: str = "1"
    outbox_cap: int = 10_000

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if self.outbox_cap < 1:
            raise SchemaError(f"outbox_cap must be at least 1, not {self.outbox_cap}")


@dataclass(frozen=True, slots=True)
class CrashReport:
    """What a collector knows about a crash; the rules scrub and gate it."""

    signature: str
    stack: str
    ip_addresses: tuple[str, ...] = ()
    default_gateway: str | None = None
    routes: tuple[dict[str, Any], ...] = ()
    uptime_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Settings:
    """The sealed state record (lifecycle, binding, consent, location), with ``control``.

    ``stamps`` says when each setting last changed (``consent:<purpose>``,
    ``precision``), for ordering the user's choices (``agent.core.ordering``).
    ``consent.suspended`` always mirrors ``control.suspended``.
    """

    consent: ConsentState
    control: Control = field(default_factory=Control)
    stamps: Mapping[str, Stamp] = field(default_factory=dict)
    lifecycle: State = State.FACTORY_NEW
    activation_trigger: str | None = None
    binding_id: str | None = None
    precision: Precision = DEFAULT_PRECISION
    location: CoarseLocation | None = None
    firmware_version: str | None = None  # the firmware that wrote the record

    @classmethod
    def fresh(cls, policy_version: str, control: Control | None = None) -> Settings:
        """A factory-new device: bound to nobody, nothing granted (opt-in, P1)."""
        control = control or Control()
        consent = ConsentState(policy_version=policy_version, suspended=control.suspended)
        return cls(consent=consent, control=control)

    def with_control(self, control: Control) -> Settings:
        """These settings under ``control``, the consent gate following its suspension."""
        consent = dataclasses.replace(self.consent, suspended=control.suspended)
        return dataclasses.replace(self, control=control, consent=consent)

    def stamped(self, key: str, stamp: Stamp) -> Settings:
        """These settings with ``key`` last changed at ``stamp``."""
        return dataclasses.replace(self, stamps={**self.stamps, key: stamp})

    def to_json(self) -> dict[str, Any]:
        """The record as sealed in the store."""
        loc, c = self.location, self.consent
        return {
            "lifecycle": self.lifecycle.value,
            "activation_trigger": self.activation_trigger,
            "binding_id": self.binding_id,
            "precision": self.precision.value,
            "location": None if loc is None else [loc.lat, loc.lon, loc.precision.value],
            "firmware_version": self.firmware_version,
            "minor": c.minor,
            "stamps": {k: v.to_json() for k, v in self.stamps.items()},
            "grants": {
                p.value: [g.granted_at, g.policy_version, g.source] for p, g in c.grants.items()
            },
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], policy_version: str, control: Control) -> Settings:
        """The record as read back; ``policy_version`` is the one configured now (P6)."""
        loc = raw.get("location")
        # "bound" is how records written before the state was renamed name it.
        state = State({"bound": "activation-due"}.get(raw["lifecycle"], raw["lifecycle"]))
        return cls(
            consent=ConsentState(
                policy_version=policy_version,
                bound=state is not State.FACTORY_NEW,
                minor=bool(raw.get("minor", False)),
                suspended=control.suspended,
                grants={
                    Purpose(p): Grant(Purpose(p), float(g[0]), str(g[1]), g[2])
                    for p, g in raw.get("grants", {}).items()
                },
            ),
            control=control,
            stamps={
                str(k): stamp
                for k, v in raw.get("stamps", {}).items()
                if (stamp := Stamp.from_json(v)) is not None
            },
            lifecycle=state,
            activation_trigger=raw.get("activation_trigger"),
            binding_id=raw.get("binding_id"),
            precision=Precision(raw.get("precision", DEFAULT_PRECISION.value)),
            location=None if loc is None else CoarseLocation(loc[0], loc[1], Precision(loc[2])),
            firmware_version=raw.get("firmware_version"),
        )
