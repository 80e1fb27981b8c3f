"""``smartmi-agent``: the device agent's command line.

The verbs act on the state directory directly, under its lock. While the daemon
runs it holds that lock, and the verbs say so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from agent.device import CrashReport, DeviceCore
from agent.errors import AgentError
from agent.location import Precision, parse_precision
from agent.purposes import Purpose
from agent.statedir import open_device

DEFAULT_CONFIG = "/etc/smartmi-agent/agent.toml"


def _purpose(value: str) -> Purpose:
    try:
        return Purpose(value)
    except ValueError:
        names = ", ".join(p.value for p in Purpose)
        raise argparse.ArgumentTypeError(f"unknown purpose {value!r}; use {names}") from None


def _precision(value: str) -> Precision:
    try:
        return parse_precision(value)
    except AgentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _act(args: argparse.Namespace, core: DeviceCore, now: float) -> Any:  # noqa: PLR0911  # one branch per verb
    verb = args.verb
    if verb == "status":
        return core.status()
    if verb == "bind":
        binding = args.binding_id or f"local-{int(now)}"
        core.bind(binding, now=now, minor=args.minor)
        return {"bound": binding, "minor": args.minor, "lifecycle": core.lifecycle.value}
    if verb in ("unbind", "factory-reset", "account-cancelled"):
        method = {
            "unbind": core.unbind,
            "factory-reset": core.factory_reset,
            "account-cancelled": core.account_cancelled,
        }[verb]
        request = method(now=now)
        return {"wiped": True, "deletion_request": request}
    if verb == "consent":
        if args.action == "grant":
            changed = core.grant(args.purpose, now=now, source="local")
            return {"granted": args.purpose.value, "changed": changed}
        removed = core.withdraw(args.purpose, now=now, source="local")
        return {"withdrawn": args.purpose.value, "pending_items_deleted": len(removed)}
    if verb == "location":
        if args.action == "set":
            loc = core.set_location(args.lat, args.lon, now=now)
            stored = (
                None
                if loc is None
                else {"lat": loc.lat, "lon": loc.lon, "precision": loc.precision.value}
            )
            return {"stored": stored}
        core.set_precision(args.level, now=now)
        return {"precision": args.level.value}
    if verb == "export":
        doc = core.export(now=now)
        if args.output:
            Path(args.output).write_text(json.dumps(doc, indent=2))
            return {"exported": args.output, "entries": len(doc["entries"])}
        return doc
    if verb == "crash":
        report = CrashReport(
            signature="simulated crash (smartmi-agent crash --simulate)",
            stack='Traceback (most recent call last):\n  File "agent/cli.py", line 1\n'
            "RuntimeError: simulated",
        )
        return {"queued": core.capture_crash(report, now=now)}
    raise AgentError(f"unknown verb {verb!r}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of smartmi-agent."""
    parser = argparse.ArgumentParser(
        prog="smartmi-agent",
        description="Consent-gated data-collection agent of a Smartmi device. Activation data "
        "and crash diagnostics leave the device only while their consent is in force.",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="agent.toml (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    sub.add_parser("status", help="lifecycle, consent, outbox and quarantine summary")
    p = sub.add_parser("bind", help="bind the device to an owner")
    p.add_argument("--binding-id", help="the binding's ID (default: generated)")
    p.add_argument(
        "--minor",
        action="store_true",
        help="the owner's account is a minor's: no personal data at all (P5)",
    )
    sub.add_parser("unbind", help="the owner deleted the device: wipe, send a deletion request")
    sub.add_parser("factory-reset", help="factory reset: wipe, send a deletion request")
    sub.add_parser("account-cancelled", help="the owner's account is gone: wipe likewise")
    p = sub.add_parser("consent", help="grant or withdraw a purpose")
    p.add_argument("action", choices=["grant", "withdraw"])
    p.add_argument("purpose", type=_purpose, help="activation or diagnostics")
    p = sub.add_parser("location", help="set the location or its precision")
    loc = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = loc.add_parser("set", help="set the location (coarsened on entry)")
    q.add_argument("lat", type=float)
    q.add_argument("lon", type=float)
    q = loc.add_parser("precision", help="off, country, region (default) or city")
    q.add_argument("level", type=_precision)
    p = sub.add_parser("export", help="the ledger of consent changes and sent messages (JSON)")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    p = sub.add_parser("crash", help="capture crash diagnostics")
    p.add_argument(
        "--simulate",
        action="store_true",
        required=True,
        help="capture a simulated crash (needs diagnostics consent)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of smartmi-agent."""
    args = build_parser().parse_args(argv)
    try:
        config: AgentConfig = load_config(Path(args.config))
        with open_device(config) as core:
            _print(_act(args, core, time.time()))
    except AgentError as exc:
        print(f"smartmi-agent: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
