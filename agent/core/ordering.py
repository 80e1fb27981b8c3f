"""The latest choice wins (SPEC §3): ordering the user's choices from two clocks.

Each setting (consent per purpose, precision, suspension) remembers when its
latest change was made, as a ``Stamp``: a cloud command at its ``issued_at`` (the
cloud's clock, exact), a local action at the device's time converted to the
cloud's clock with the device's last measured offset (``Clock``, from the
command sync at every connection), with the error that conversion may carry. A
device that has never compared its clock has an unknown error.

``order`` says whether a cloud command was issued certainly after, certainly
before, or at an unknown place relative to a stamp. ``admit`` turns that into a
verdict: a command that narrows collection is applied unless it is certainly
older; one that widens it is applied only if it is certainly newer. Where the
order cannot be told, the narrowing choice wins (fail closed).

Pure: callers pass ``now`` (device time) and the command's ``issued_at``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

Source = Literal["local", "cloud"]
Direction = Literal["narrowing", "widening"]
Order = Literal["newer", "older", "unknown"]

# How fast a device clock may drift from the cloud's between two comparisons.
DRIFT: Final = 1e-4  # 100 ppm, a generous bound for a crystal oscillator
# Added to half the round trip: the sync answer's own timestamp is not exact.
SYNC_SLACK_S: Final = 0.25


@dataclass(frozen=True, slots=True)
class Clock:
    """The device clock compared with the cloud's: ``device time - cloud time``."""

    offset: float
    error: float  # how far ``offset`` may be off when it was measured
    measured_at: float  # device time of the measurement

    @classmethod
    def from_sync(cls, sent_at: float, answered_at: float, received_at: float) -> Clock:
        """From a sync request sent and its answer received (device times) and the
        cloud's time in the answer: the offset at the midpoint, off by half the trip."""
        trip = max(0.0, received_at - sent_at)
        return cls(
            offset=(sent_at + received_at) / 2 - answered_at,
            error=trip / 2 + SYNC_SLACK_S,
            measured_at=received_at,
        )

    def error_at(self, now: float) -> float:
        """The error of the offset at ``now``: it grows with the time since it was measured."""
        return self.error + DRIFT * abs(now - self.measured_at)

    def to_cloud(self, now: float) -> float:
        """Device time ``now`` on the cloud's clock."""
        return now - self.offset

    def to_device(self, t: float) -> float:
        """Cloud time ``t`` on the device's clock."""
        return t + self.offset

    def to_json(self) -> list[float]:
        """As sealed in the control record."""
        return [self.offset, self.error, self.measured_at]

    @classmethod
    def from_json(cls, raw: Any) -> Clock | None:
        """As read back (None for a record without one)."""
        if raw is None:
            return None
        return cls(float(raw[0]), float(raw[1]), float(raw[2]))


@dataclass(frozen=True, slots=True)
class Stamp:
    """When a setting's latest change was made, on the cloud's clock where known."""

    at: float
    source: Source
    error: float | None  # None: the device clock was never compared, the order is unknown

    @classmethod
    def cloud(cls, issued_at: float) -> Stamp:
        """A cloud command's issue time: the cloud's own clock."""
        return cls(issued_at, "cloud", 0.0)

    @classmethod
    def local(cls, clock: Clock | None, now: float) -> Stamp:
        """A local action at device time ``now``."""
        if clock is None:
            return cls(now, "local", None)
        return cls(clock.to_cloud(now), "local", clock.error_at(now))

    def to_json(self) -> list[Any]:
        """As sealed in the store."""
        return [self.at, self.source, self.error]

    @classmethod
    def from_json(cls, raw: Any) -> Stamp | None:
        """As read back."""
        if raw is None:
            return None
        error = None if raw[2] is None else float(raw[2])
        return cls(float(raw[0]), "cloud" if raw[1] == "cloud" else "local", error)


def rebased(stamp: Stamp, clock: Clock) -> Stamp:
    """A local stamp taken before the device clock was ever compared, put on the cloud's
    clock with the first comparison. This assumes the clock was not stepped in between;
    its drift since is added to the error."""
    if stamp.error is not None or stamp.source != "local":
        return stamp
    return Stamp(clock.to_cloud(stamp.at), "local", clock.error_at(stamp.at))


def order(issued_at: float, latest: Stamp | None) -> Order:
    """Was a command issued at ``issued_at`` certainly after ``latest``, before it, or unknown?"""
    if latest is None:
        return "newer"
    if latest.error is None:
        return "unknown"
    gap = issued_at - latest.at
    if gap > latest.error:
        return "newer"
    if gap < -latest.error:
        return "older"
    return "unknown"


def admit(direction: Direction, issued_at: float, latest: Stamp | None) -> Order | None:
    """None if a command may change the setting; otherwise why not (its order)."""
    seen = order(issued_at, latest)
    if direction == "narrowing":
        return None if seen != "older" else seen
    return None if seen == "newer" else seen
