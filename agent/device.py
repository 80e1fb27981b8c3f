"""The device core: one device's rules and storage, driven by events with an explicit ``now``.

Synchronous and clock-free: the daemon, the CLI and the simulator call these
methods and carry out what they return. Every capture and every hand-off to the
transport goes through ``consent.decide`` (P1).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core import consent, ledger, lifecycle
from agent.core.consent import ConsentState, Decision, Grant, Source
from agent.core.identity import validate_device_id
from agent.core.items import DropReason, ItemEvent, ItemState, Outgoing, item_step, overflow
from agent.core.lifecycle import Event, State
from agent.core.location import (
    DEFAULT_PRECISION,
    CoarseLocation,
    Precision,
    coarsen,
    recoarsen,
)
from agent.core.purposes import (
    DELETION_KIND,
    POLICIES,
    Purpose,
    build_envelope,
    rfc3339,
)
from agent.core.scrub import scrub
from agent.errors import ConsentNotInForce, SchemaError
from agent.store.database import DeviceStore, StoredItem

RETENTION_SWEEP_S = 60.0  # how often the outbox is swept for expired items (P7)


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What the core needs to know about the device and the policy."""

    device_id: str
    serial: str
    model: str
    firmware_version: str
    policy_version: str = "1"
    outbox_cap: int = 10_000
    crash_dir: Path | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if self.outbox_cap < 1:
            raise SchemaError(f"outbox_cap must be at least 1, not {self.outbox_cap}")


@dataclass(frozen=True, slots=True)
class CrashReport:
    """What a collector knows about a crash; the core scrubs and gates it."""

    signature: str
    stack: str
    ip_addresses: tuple[str, ...] = ()
    default_gateway: str | None = None
    routes: tuple[dict[str, Any], ...] = ()
    uptime_s: float = 0.0


@dataclass(slots=True)
class _Settings:
    """The sealed state record, as it lives in memory."""

    lifecycle: State = State.FACTORY_NEW
    activation_trigger: str | None = None
    binding_id: str | None = None
    precision: Precision = DEFAULT_PRECISION
    location: CoarseLocation | None = None
    firmware_version: str | None = None
    suspended: bool = False
    minor: bool = False
    grants: dict[Purpose, Grant] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        loc = self.location
        return {
            "lifecycle": self.lifecycle.value,
            "activation_trigger": self.activation_trigger,
            "binding_id": self.binding_id,
            "precision": self.precision.value,
            "location": None if loc is None else [loc.lat, loc.lon, loc.precision.value],
            "firmware_version": self.firmware_version,
            "suspended": self.suspended,
            "minor": self.minor,
            "grants": {
                p.value: [g.granted_at, g.policy_version, g.source] for p, g in self.grants.items()
            },
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> _Settings:
        loc = raw.get("location")
        return cls(
            lifecycle=State(raw["lifecycle"]),
            activation_trigger=raw.get("activation_trigger"),
            binding_id=raw.get("binding_id"),
            precision=Precision(raw.get("precision", DEFAULT_PRECISION.value)),
            location=None if loc is None else CoarseLocation(loc[0], loc[1], Precision(loc[2])),
            firmware_version=raw.get("firmware_version"),
            suspended=bool(raw.get("suspended", False)),
            minor=bool(raw.get("minor", False)),
            grants={
                Purpose(p): Grant(Purpose(p), float(g[0]), str(g[1]), g[2])
                for p, g in raw.get("grants", {}).items()
            },
        )


PurgeListener = Callable[[list[str]], None]


class DeviceCore:
    """One device: consent, lifecycle, location, outbox, ledger and wipe."""

    def __init__(
        self,
        store: DeviceStore,
        config: CoreConfig,
        *,
        now: float,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.store = store
        self.config = config
        self._new_id = new_id
        self._in_flight: dict[str, Outgoing] = {}
        # In flight when their purpose was withdrawn: a PUBACK may still come for
        # them (they left the device before the withdrawal), and is then ledgered.
        self._recalled: dict[str, Outgoing] = {}
        # Called with msg_ids that must not leave the device any more (P2): the
        # transport removes them from whatever the MQTT client still holds.
        self.purge_listeners: list[PurgeListener] = []
        # Called when something may have become sendable (a capture, a deletion
        # request, a resume, a requeue): the transport wakes its drain loop.
        self.wake_listeners: list[Callable[[], None]] = []
        # Observers of the outbox (the simulator's ground truth): an item queued with
        # consent, and an item the broker acknowledged.
        self.queued_listeners: list[Callable[[str, Purpose, float], None]] = []
        self.ack_listeners: list[Callable[[str, float], None]] = []
        self.dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        # Cheap hand-offs: whether deletion requests may be pending (known after the
        # first look, set again by a wipe), and when retention was last swept.
        self._deletions_maybe = True
        self._last_sweep = float("-inf")
        if store.pending_wipe() is not None:
            store.finish_wipe()  # a wipe cut short by a crash is finished first (P9)
        raw = store.load_state()
        self.settings = _Settings.from_json(raw) if raw else _Settings()
        if raw is None and store.has_data_key():
            # The key exists but the state is gone (quarantined): queued items were
            # captured under consent we can no longer show, and the ledger belongs to
            # an owner we no longer know. All of it goes to quarantine, none is sent.
            store.quarantine_all("state record unreadable")
        self._queued = store.count()
        self._purge_superseded()
        if (
            self.settings.firmware_version is not None
            and self.settings.firmware_version != config.firmware_version
        ):
            self.firmware_updated(config.firmware_version, now=now)
        elif self.settings.lifecycle is not State.FACTORY_NEW:
            self._save()

    # -- views -------------------------------------------------------------
    @property
    def device_id(self) -> str:
        """This device's ID."""
        return self.config.device_id

    @property
    def lifecycle(self) -> State:
        """The lifecycle state."""
        return self.settings.lifecycle

    @property
    def consent(self) -> ConsentState:
        """The consent state as the pure gate sees it."""
        s = self.settings
        return ConsentState(
            policy_version=self.config.policy_version,
            bound=s.lifecycle is not State.FACTORY_NEW,
            minor=s.minor,
            suspended=s.suspended,
            grants=s.grants,
        )

    def decide(self, purpose: Purpose) -> Decision:
        """The single gate: may an item of ``purpose`` be captured or sent now?"""
        return consent.decide(self.consent, purpose)

    def queued_count(self) -> int:
        """How many items wait in the outbox (not counting deletion requests)."""
        return self._queued

    def in_flight(self) -> list[str]:
        """msg_ids handed to the transport and not yet acknowledged."""
        return list(self._in_flight)

    # -- persistence helpers -----------------------------------------------
    def _wake(self) -> None:
        for listener in self.wake_listeners:
            listener()

    def _save(self) -> None:
        self.settings.firmware_version = self.config.firmware_version
        self.store.save_state(self.settings.to_json())

    def _apply_consent(self, new: ConsentState) -> None:
        self.settings.grants = dict(new.grants)
        self.settings.suspended = new.suspended

    def _drop(self, msg_ids: list[str], reason: DropReason) -> None:
        """Account for outbox rows just deleted, and tell the transport to forget them."""
        if not msg_ids:
            return
        self.dropped[reason] += len(msg_ids)
        self._queued -= len(msg_ids)
        for msg_id in msg_ids:
            out = self._in_flight.pop(msg_id, None)
            if out is not None:
                item_step(ItemState.IN_FLIGHT, ItemEvent.DROP)
                self._recalled[msg_id] = out
        for listener in self.purge_listeners:
            listener(msg_ids)

    def _ledger_consent(
        self, action: str, purpose: Purpose | None, now: float, source: Source
    ) -> None:
        self.store.append_ledger(
            ledger.consent_entry(
                action,
                purpose.value if purpose else None,
                now=now,
                source=source,
                policy_version=self.config.policy_version,
            )
        )

    def _purge_superseded(self) -> None:
        """Drop items whose grant is no longer the one in force (P6: policy changed)."""
        for purpose in Purpose:
            decision = self.decide(purpose)
            if decision.reason in (consent.Reason.STALE_POLICY, consent.Reason.NOT_GRANTED):
                self._drop(self.store.purge_purpose(purpose), DropReason.SUPERSEDED)

    # -- lifecycle ---------------------------------------------------------
    def bind(self, binding_id: str, *, now: float, minor: bool = False) -> None:
        """Bind to an owner; an activation becomes due (first, or restore after a wipe)."""
        if not binding_id or len(binding_id) > 128:
            raise SchemaError("binding_id must be 1 to 128 characters")
        step = lifecycle.step(self.settings.lifecycle, Event.BIND)
        restored = self.store.wipe_count() > 0
        precision, location = self.settings.precision, self.settings.location
        self.settings = _Settings(
            lifecycle=step.state,
            activation_trigger="restore" if restored else "first-activation",
            binding_id=binding_id,
            minor=minor,
            precision=precision,
            location=location,
        )
        self._save()
        self._maybe_activate(now)

    def firmware_updated(self, version: str, *, now: float) -> None:
        """A new firmware runs: a fresh activation is due if the device is bound."""
        step = lifecycle.step(self.settings.lifecycle, Event.FIRMWARE_UPDATE)
        self.config = dataclasses.replace(self.config, firmware_version=version)
        if step.effect == "activation-due":
            self.settings.lifecycle = step.state
            self.settings.activation_trigger = "firmware-update"
            self._save()
            self._maybe_activate(now)

    def set_policy_version(self, version: str, *, now: float) -> None:
        """The configured privacy policy changed: earlier grants stop counting (P6)."""
        if not version:
            raise SchemaError("policy_version must not be empty")
        self.config = dataclasses.replace(self.config, policy_version=version)
        self._purge_superseded()
        if self.settings.lifecycle is not State.FACTORY_NEW:
            self._maybe_activate(now)

    def _maybe_activate(self, now: float) -> str | None:
        """Capture the due activation if its consent is in force (once per trigger, P4)."""
        s = self.settings
        if s.lifecycle is not State.BOUND or s.activation_trigger is None:
            return None
        decision = self.decide(Purpose.ACTIVATION)
        if not decision.allowed or decision.grant is None:
            return None
        loc = recoarsen(s.location, s.precision)
        data = {
            "serial": self.config.serial,
            "model": self.config.model,
            "firmware_version": self.config.firmware_version,
            "trigger": s.activation_trigger,
            "location": None
            if loc is None
            else {
                "lat": loc.lat,
                "lon": loc.lon,
                "precision": loc.precision.value,
            },
        }
        msg_id = self._enqueue(Purpose.ACTIVATION, data, decision.grant, now)
        s.lifecycle = lifecycle.step(s.lifecycle, Event.ACTIVATE).state
        s.activation_trigger = None
        self._save()
        return msg_id

    def unbind(self, *, now: float) -> str | None:
        """The owner deleted the device in the app; returns the deletion request's msg_id."""
        return self._wipe(Event.UNBIND, now)

    def factory_reset(self, *, now: float) -> str | None:
        """Factory reset; returns the deletion request's msg_id (None if nothing was bound)."""
        return self._wipe(Event.FACTORY_RESET, now)

    def account_cancelled(self, *, now: float) -> str | None:
        """The owner's account was cancelled; returns the deletion request's msg_id."""
        return self._wipe(Event.ACCOUNT_CANCELLED, now)

    def _wipe(self, event: Event, now: float) -> str | None:
        """P9 wipe and P10 deletion request."""
        step = lifecycle.step(self.settings.lifecycle, event)
        reason = lifecycle.WIPE_REASONS[event]
        request: tuple[str, float, bytes] | None = None
        if step.effect == "wipe" and self.settings.binding_id is not None:
            msg_id = self._new_id()
            payload = build_envelope(
                kind=DELETION_KIND,
                msg_id=msg_id,
                device_id=self.device_id,
                captured_at=now,
                data={
                    "binding_id": self.settings.binding_id,
                    "reason": reason,
                    "requested_at": rfc3339(now),
                },
                receipt=None,
            )
            request = (msg_id, now, payload)
        # Everything personal that the transport still holds must go too. An item in
        # flight keeps its outbox row until acknowledged, so the rows name them all.
        doomed = self.store.msg_ids()
        if step.effect == "wipe":
            self.store.begin_wipe(reason, request)
        self.store.finish_wipe()
        self._in_flight = {k: v for k, v in self._in_flight.items() if v.purpose is None}
        self._recalled.clear()
        self.dropped[DropReason.WIPED] += len(doomed)
        self._queued = 0
        for listener in self.purge_listeners:
            listener(doomed)
        if self.config.crash_dir is not None and self.config.crash_dir.is_dir():
            for crash_file in self.config.crash_dir.iterdir():
                if crash_file.is_file():
                    crash_file.unlink()
        self.settings = _Settings()
        if request is not None:
            self._deletions_maybe = True
            self._wake()
        return request[0] if request else None

    # -- consent -----------------------------------------------------------
    def _require_bound(self, what: str) -> None:
        if self.settings.lifecycle is State.FACTORY_NEW:
            raise ConsentNotInForce(what, "the device is not bound to an owner")

    def grant(self, purpose: Purpose, *, now: float, source: Source = "local") -> bool:
        """Grant consent for a purpose; returns False if it was already in force."""
        self._require_bound(purpose.value)
        before = self.consent
        after = consent.grant(before, purpose, now=now, source=source)
        if after is before:
            return False
        self._apply_consent(after)
        self._drop(self.store.purge_purpose(purpose), DropReason.SUPERSEDED)
        self._ledger_consent("grant", purpose, now, source)
        self._save()
        self._maybe_activate(now)
        return True

    def withdraw(self, purpose: Purpose, *, now: float, source: Source = "local") -> list[str]:
        """Withdraw consent (P2): before this returns, nothing of ``purpose`` is pending
        anywhere; returns the msg_ids removed."""
        if self.settings.lifecycle is State.FACTORY_NEW:
            return []
        self._apply_consent(consent.withdraw(self.consent, purpose))
        self._save()  # from here on the gate says no, even if we crash mid-purge
        purged = self.store.purge_purpose(purpose)
        self._drop(purged, DropReason.WITHDRAWN)
        self._ledger_consent("withdraw", purpose, now, source)
        return purged

    def set_suspended(self, value: bool, *, now: float, source: Source = "cloud") -> None:
        """Suspend (P13) or resume all personal-data collection."""
        if self.settings.lifecycle is State.FACTORY_NEW or self.settings.suspended == value:
            return
        self._apply_consent(consent.suspended(self.consent, value))
        self._ledger_consent("suspend" if value else "resume", None, now, source)
        self._save()
        if value:
            for msg_id in [m for m, o in self._in_flight.items() if o.purpose is not None]:
                self.requeue(msg_id)  # held, not sent, while suspended
        else:
            self._maybe_activate(now)
            self._wake()  # held items may leave again

    # -- location ----------------------------------------------------------
    def set_precision(self, precision: Precision, *, now: float) -> None:
        """Change the location precision; a stored location can only get coarser (P3)."""
        self.settings.precision = precision
        self.settings.location = recoarsen(self.settings.location, precision)
        self._save()

    def set_location(self, lat: float, lon: float, *, now: float) -> CoarseLocation | None:
        """Take a position; it is coarsened here, the exact value is never kept (P3)."""
        self.settings.location = coarsen(lat, lon, self.settings.precision)
        self._save()
        return self.settings.location

    # -- capture -----------------------------------------------------------
    def capture_crash(self, report: CrashReport, *, now: float) -> str:
        """Queue crash diagnostics if diagnostics consent is in force; return the msg_id."""
        decision = self.decide(Purpose.DIAGNOSTICS)
        if not decision.allowed or decision.grant is None:
            raise ConsentNotInForce(Purpose.DIAGNOSTICS.value, decision.reason.value)
        data = {
            "ip_addresses": list(report.ip_addresses),
            "default_gateway": report.default_gateway,
            "routes": list(report.routes),
            "signature": scrub(report.signature)[:256] or "unknown",
            "stack": scrub(report.stack),
            "firmware_version": self.config.firmware_version,
            "uptime_s": float(report.uptime_s),
        }
        return self._enqueue(Purpose.DIAGNOSTICS, data, decision.grant, now)

    def _enqueue(self, purpose: Purpose, data: dict[str, Any], grant: Grant, now: float) -> str:
        policy = POLICIES[purpose]
        msg_id = self._new_id()
        payload = build_envelope(
            kind=policy.kind,
            msg_id=msg_id,
            device_id=self.device_id,
            captured_at=now,
            data=data,
            receipt=grant.receipt(),
        )
        with self.store.db.transaction():
            self.store.enqueue(msg_id, purpose, now, payload)
            self._queued += 1
            excess = overflow(self._queued, self.config.outbox_cap)
            if excess:
                self._drop(self.store.purge_oldest(excess), DropReason.CAPACITY)
        for listener in self.queued_listeners:
            listener(msg_id, purpose, now)
        self._wake()
        return msg_id

    # -- hand-off to the transport -----------------------------------------
    def next_batch(self, *, now: float, limit: int = 32) -> list[Outgoing]:
        """Items to publish now, marked in flight: deletion requests first, then the outbox.

        Items past retention are deleted first and never returned (P7); an item is
        returned only if the gate allows its purpose now and it was captured under
        the grant in force (P1, P2, P6).
        """
        out: list[Outgoing] = []
        if self._deletions_maybe:
            requests = self.store.deletion_requests()
            self._deletions_maybe = bool(requests)
            waiting = [dr for dr in requests if dr.msg_id not in self._in_flight]
            out.extend(self._hand_off(dr, None) for dr in waiting[:limit])
        if not self._last_sweep <= now < self._last_sweep + RETENTION_SWEEP_S:
            # The full sweep runs at most once a minute (or when the clock went back);
            # between sweeps an expired item is still caught below, before it is sent.
            self._last_sweep = now
            for purpose in Purpose:
                cutoff = now - POLICIES[purpose].retention_s
                self._drop(self.store.purge_older_than(purpose, cutoff), DropReason.EXPIRED)
        allowed = {p for p in Purpose if self.decide(p).allowed}
        if len(out) >= limit or not allowed:
            return out
        expired: list[str] = []
        for item in self.store.queued(limit - len(out), frozenset(self._in_flight)):
            if item.purpose not in allowed:
                continue
            if item.captured_at < now - POLICIES[item.purpose].retention_s:
                expired.append(item.msg_id)  # P7: never sent
                continue
            out.append(self._hand_off(item, item.purpose))
        if expired:
            self._drop(self.store.delete_items(expired), DropReason.EXPIRED)
        return out

    def _hand_off(self, item: StoredItem, purpose: Purpose | None) -> Outgoing:
        item_step(ItemState.QUEUED, ItemEvent.HAND_OFF)
        kind = DELETION_KIND if purpose is None else POLICIES[purpose].kind
        out = Outgoing(item.msg_id, kind, purpose, item.payload, item.captured_at)
        self._in_flight[item.msg_id] = out
        return out

    def acknowledged(self, msg_id: str, *, now: float) -> bool:
        """The broker acknowledged ``msg_id``: remove it and ledger it, atomically."""
        out = self._in_flight.pop(msg_id, None)
        if out is None:
            recalled = self._recalled.pop(msg_id, None)
            if recalled is not None:
                for listener in self.ack_listeners:
                    listener(msg_id, now)
            if recalled is not None and recalled.purpose is not None:
                self.store.append_ledger(
                    ledger.sent_entry(msg_id, recalled.purpose.value, recalled.payload, now=now)
                )
            return False
        item_step(ItemState.IN_FLIGHT, ItemEvent.ACK)
        for listener in self.ack_listeners:
            listener(msg_id, now)
        if out.purpose is None:
            self.store.remove_deletion_request(msg_id)
            return True
        if self.store.acknowledge(
            msg_id, ledger.sent_entry(msg_id, out.purpose.value, out.payload, now=now)
        ):
            self._queued -= 1
        return True

    def requeue(self, msg_id: str) -> None:
        """A hand-off failed (connection lost, PUBACK refused): the item waits again."""
        if self._in_flight.pop(msg_id, None) is not None:
            item_step(ItemState.IN_FLIGHT, ItemEvent.REQUEUE)
            self._wake()

    def connection_lost(self) -> None:
        """Every in-flight item goes back to queued (same msg_id: at-least-once)."""
        self._recalled.clear()  # the transport forgot them: no PUBACK can come now
        for msg_id in list(self._in_flight):
            self.requeue(msg_id)

    # -- P11 ---------------------------------------------------------------
    def export(self, *, now: float) -> dict[str, Any]:
        """The ledger as the JSON document a user receives."""
        return ledger.export(self.device_id, self.store.ledger(), now=now)

    def status(self) -> dict[str, Any]:
        """A summary for the CLI and the control socket (no personal values)."""
        s = self.settings
        return {
            "device_id": self.device_id,
            "lifecycle": s.lifecycle.value,
            "activation_due": s.activation_trigger,
            "minor": s.minor,
            "suspended": s.suspended,
            "policy_version": self.config.policy_version,
            "consent": {p.value: self.decide(p).reason.value for p in Purpose},
            "precision": s.precision.value,
            "location_set": s.location is not None,
            "queued": self._queued,
            "in_flight": len(self._in_flight),
            "deletion_requests_pending": len(self.store.deletion_requests()),
            "quarantined": self.store.quarantined(),
            "dropped": {r.value: n for r, n in self.dropped.items() if n},
        }
