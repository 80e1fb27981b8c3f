"""What one event requires of the shell: a ``Plan`` and its parts.

Every rule returns a ``Plan`` (``agent.core.rules`` names them all): the new
``Settings`` and what ``agent.device.Device`` must carry out on the store in one
transaction: purge (``Purge``), re-coarsen (``Recoarsen``), capture (``Capture``),
ledger, wipe (``Wipe``), save; and the purposes the transport must stop at once
(``Plan.stop``). Plans of one event chain with ``Plan.then``.

Pure: frozen records, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from agent.core.items import DropReason
from agent.core.location import Precision
from agent.core.purposes import Purpose
from agent.core.settings import Settings
from agent.errors import SchemaError

ALL: Final = frozenset(Purpose)


@dataclass(frozen=True, slots=True)
class Purge:
    """Delete the queued items of ``purpose``, for ``reason``: every one, or only those
    captured before the device time ``before`` (a narrowing heard late, SPEC §3)."""

    purpose: Purpose
    reason: DropReason
    before: float | None = None


@dataclass(frozen=True, slots=True)
class Recoarsen:
    """Re-coarsen the location of queued activations to ``precision`` (P3): every one,
    or only those captured before the device time ``before``."""

    precision: Precision
    before: float | None = None


@dataclass(frozen=True, slots=True)
class Capture:
    """A new item to queue: its payload is built, the shell seals and stores it."""

    msg_id: str
    purpose: Purpose
    captured_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class Wipe:
    """P9: destroy the data key and every personal record; ``journal`` makes it resumable.

    ``deletion_request`` (msg_id, created_at, payload) is the P10 request that the
    journal keeps, under the system key, until the cloud acknowledges it.
    """

    reason: str
    journal: bool
    deletion_request: tuple[str, float, bytes] | None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one event requires of the shell."""

    settings: Settings
    save: bool = True  # the settings changed: seal and write the record
    purge: tuple[Purge, ...] = ()
    # Queued activations whose location must be re-coarsened (P3).
    recoarsen: tuple[Recoarsen, ...] = ()
    capture: Capture | None = None
    ledger: tuple[dict[str, Any], ...] = ()
    wipe: Wipe | None = None
    # Purposes that must stop leaving before the event returns (P2, P3, P9, P13).
    stop: frozenset[Purpose] = field(default_factory=frozenset)

    @property
    def noop(self) -> bool:
        """Whether the event changed nothing at all."""
        return not (
            self.save
            or self.purge
            or self.capture
            or self.ledger
            or self.wipe
            or self.stop
            or self.recoarsen
        )

    @property
    def narrows(self) -> bool:
        """Whether the plan reduces what is collected or kept: it must take effect in
        memory even when its write fails, and its write is retried (fail closed)."""
        return bool(self.stop or self.purge or self.wipe is not None or self.recoarsen)

    def then(self, nxt: Plan) -> Plan:
        """This plan followed by ``nxt``, which was decided on this plan's settings."""
        if self.capture is not None and nxt.capture is not None:
            raise SchemaError("one event captures at most one item")
        return Plan(
            nxt.settings,
            save=self.save or nxt.save,
            purge=self.purge + nxt.purge,
            recoarsen=self.recoarsen + nxt.recoarsen,
            capture=self.capture or nxt.capture,
            ledger=self.ledger + nxt.ledger,
            wipe=nxt.wipe or self.wipe,
            stop=self.stop | nxt.stop,
        )


def unchanged(s: Settings) -> Plan:
    """A plan that carries out nothing."""
    return Plan(s, save=False)
