"""The personal-data ledger (P11): consent changes and every message sent.

A sent-message entry names the purpose, time, msg_id, the payload's field names and
its SHA-256 — never the values — so the export proves what left the device without
becoming a second copy of the data.
"""

from __future__ import annotations

import json
from typing import Any, Final

from agent.core.purposes import payload_digest, rfc3339

EXPORT_SCHEMA: Final = "smartmi.ledger-export/1"


def consent_entry(
    action: str, purpose: str | None, *, now: float, source: str, policy_version: str
) -> dict[str, Any]:
    """An entry for a consent change (grant, withdraw, suspend, resume)."""
    return {
        "type": "consent",
        "action": action,
        "purpose": purpose,
        "at": rfc3339(now),
        "source": source,
        "policy_version": policy_version,
    }


def sent_entry(
    msg_id: str, purpose: str, payload: bytes, *, now: float, confirmed: bool = True
) -> dict[str, Any]:
    """An entry for a message that left the device: ``confirmed`` by the broker's PUBACK,
    or not (written to the network, then its purpose stopped and the link lost)."""
    data = json.loads(payload).get("data", {})
    return {
        "type": "sent",
        "msg_id": msg_id,
        "purpose": purpose,
        "at": rfc3339(now),
        "fields": sorted(data),
        "sha256": payload_digest(payload),
        "confirmed": confirmed,
    }


def export(device_id: str, entries: list[dict[str, Any]], *, now: float) -> dict[str, Any]:
    """The JSON document a user receives on request."""
    return {
        "schema": EXPORT_SCHEMA,
        "device_id": device_id,
        "exported_at": rfc3339(now),
        "entries": entries,
    }
