"""The checker's self-test over a real fleet: every kind of broken promise is injected
(a device whose fault switch ignores consent, rogue messages published with real
device certificates, items dropped behind the agent's back) and each is caught."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping
from html import escape
from pathlib import Path

import pytest

from agent.core import consent
from agent.core.purposes import Purpose, rfc3339
from agent.device import CrashReport
from simulator import html, report, story
from simulator.broker import MosquittoBroker
from simulator.checker import check
from simulator.fleet import Fleet, FleetBroker
from simulator.pki import DevPki
from simulator.report import RULES
from simulator.scenario import Scenario
from tests.mqtt_probe import PahoClient

pytestmark = pytest.mark.asyncio

SCENARIO = Scenario.model_validate(
    {
        "name": "selftest",
        "seed": 5,
        "duration_s": 3.0,
        "settle_s": 20,
        "groups": [
            {
                "name": "adults",
                "share": 0.8,
                "events": [
                    {"at": 0.0, "action": "bind"},
                    {"at": 0.2, "action": "location", "lat": 48.137, "lon": 11.575},
                    {"at": 0.5, "action": "grant", "purpose": "activation"},
                    {"at": 0.5, "action": "grant", "purpose": "diagnostics"},
                    {"at": 1.0, "action": "crash"},
                    {"at": 2.0, "action": "withdraw", "purpose": "diagnostics"},
                    {"at": 2.5, "action": "crash"},
                ],
            },
            {
                "name": "kids",
                "share": 0.2,
                "events": [{"at": 0.0, "action": "bind", "minor": True}],
            },
        ],
    }
)


def rogue(broker: MosquittoBroker, pki: DevPki, device_id: str, kind: str, doc: object) -> None:
    """Publish as ``device_id`` with its real certificate (it is kicked off and reconnects)."""
    client = PahoClient(broker, pki.ca_cert, pki.device(device_id), device_id)
    client.connect()
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    client.publish(f"smartmi/v1/{device_id}/up/{kind}", payload)
    client.close()


def envelope(
    device_id: str, kind: str, captured: float, data: Mapping[str, object], **kw: object
) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema": f"smartmi.{kind}/1",
        "msg_id": f"rogue-{kind}-{time.time_ns()}",
        "device_id": device_id,
        "captured_at": rfc3339(captured),
        "data": data,
    }
    doc.update(kw)
    return doc


async def test_every_kind_of_violation_is_caught(
    tmp_path: Path, own_broker: MosquittoBroker, pki: DevPki
) -> None:
    liars: list[str] = []

    async def inject(fleet: Fleet) -> None:
        adults = sorted(d for d in fleet.devices if "adults" in d)
        kid = next(d for d in fleet.devices if "kids" in d)
        now = time.time()
        # 1. A device whose fault switch ignores consent: it captures after withdrawal.
        # Its in-memory consent says granted, with no grant on the timeline.
        liar = fleet.devices[adults[0]].core
        liars.append(adults[0])
        forged = consent.grant(liar.consent, Purpose.DIAGNOSTICS, now=now - 10, source="local")
        liar.plans.settings = dataclasses.replace(liar.settings, consent=forged)
        liar.capture_crash(CrashReport("after withdrawal", "x"), now=now)
        # 2. An item dropped behind the agent's back: queued with consent, never sent.
        core = fleet.devices[adults[1]].core
        core.grant(Purpose.DIAGNOSTICS, now=now)
        core.store.delete_items([core.capture_crash(CrashReport("lost", "x"), now=now)])
        # 3. A wipe whose deletion request is destroyed before it can leave.
        core = fleet.devices[adults[2]].core
        request = core.unbind(now=now)
        assert request is not None
        core.store.remove_deletion_request(request)
        # 4. Rogue messages with real device certificates.
        crash: dict[str, object] = {
            "ip_addresses": [], "default_gateway": None, "routes": [], "signature": "s",
            "exception": "KeyError", "frames": [], "firmware_version": "1.0.0", "uptime_s": 1.0,
        }  # fmt: skip
        receipt = {"purpose": "diagnostics", "policy_version": "1", "granted_at": rfc3339(now - 5)}
        activation = {
            "serial": "S", "model": "m", "firmware_version": "1.0.0", "trigger": "restore",
            "location": {"lat": 48.137, "lon": 11.575, "precision": "city"},
        }  # fmt: skip
        act_receipt = {**receipt, "purpose": "activation"}
        r = adults[3]
        rogue(
            own_broker,
            pki,
            r,
            "activation",
            envelope(r, "activation", now, activation, consent=act_receipt),
        )
        rogue(own_broker, pki, kid, "crash", envelope(kid, "crash", now, crash, consent=receipt))
        rogue(own_broker, pki, r, "crash", b"{not an envelope")
        rogue(
            own_broker, pki, r, "crash", envelope(adults[4], "crash", now, crash, consent=receipt)
        )
        dr = {"binding_id": "b", "reason": "unbind", "requested_at": rfc3339(now)}
        rogue(own_broker, pki, r, "deletion-request", envelope(r, "deletion-request", now, dr))
        # 5. Data captured before a wipe, arriving after it.
        wiped = adults[5]
        fleet.devices[wiped].truth.log(now, "wipe", reason="unbind")
        old = envelope(wiped, "crash", now - 0.5, crash, consent=receipt)
        # Time must pass: past the grace a message on the wire at the wipe may take.
        await asyncio.sleep(fleet.devices[wiped].truth.grace_s + 0.3)
        rogue(own_broker, pki, wiped, "crash", old)

    fleet = Fleet(
        SCENARIO,
        10,
        workdir=tmp_path / "run",
        pki=pki,
        broker=FleetBroker(own_broker.host, own_broker.port, restart=own_broker.restart),
        progress=False,
        inject=inject,
    )
    await fleet.run()
    verdict = check({d: dev.truth for d, dev in fleet.devices.items()}, fleet.cloud.received)
    [liar_id] = liars
    caught = {v.kind for v in verdict.violations}
    assert caught == set(RULES), sorted(verdict.violations, key=lambda v: v.kind)
    # The page a person looks at lists every one of them, on the timeline and in full.
    page_path = tmp_path / "selftest.html"
    doc = report.build(fleet, verdict)
    truths = {d: dev.truth for d, dev in fleet.devices.items()}
    told = story.stories(truths, fleet.cloud.received, doc["violations"])
    html.write(doc, fleet.cloud.received, verdict.latencies_s, page_path, told)
    page = page_path.read_text()
    assert f"Violations ({len(verdict.violations)})" in page
    assert "Violations on the timeline" in page
    for v in verdict.violations:
        assert escape(v.detail) in page
    # The liar's story: its withdrawal, then the crash it captured and sent after it.
    section = page[page.index(f"<code>{escape(liar_id)}</code>: its story") :]
    section = section[: section.index("</section>")]
    withdrawn = section.index("<td>withdraw diagnostics</td>")
    assert section.index('<tr class="flagged">', withdrawn) > withdrawn
    assert "left the device</td><td>crash (seen at the broker)" in section or (
        "left the device</td><td>crash (acknowledged by the broker)" in section
    )
