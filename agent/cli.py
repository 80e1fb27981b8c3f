"""``smartmi-agent``: the device agent's command line.

``run`` is the daemon. The other verbs talk to it over its control socket, or,
when no daemon runs, act on the state directory directly under its lock.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent import installed_version
from agent.config import AgentConfig, load_config
from agent.core.location import parse_precision
from agent.core.purposes import parse_purpose
from agent.device import open_device
from agent.errors import AgentError, ConfigError, DaemonUnreachable
from agent.runtime import control, summaries
from agent.runtime.logs import setup_logging
from agent.runtime.terminal import anywhere, quiet_pipe
from agent.store import faults
from agent.store.fsutil import write_private
from agent.store.statedir import as_owner_of, require_usable

DEFAULT_CONFIG = "/etc/smartmi-agent/agent.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
READ_ONLY = frozenset({"status", "export"})  # verbs that only read the state
T = TypeVar("T")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from one of the core's parsers: its error becomes argparse's."""

    def convert(value: str) -> T:
        try:
            return parse(value)
        except AgentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """The control request for the parsed command line."""
    verb = args.verb
    body: dict[str, Any] = {"verb": verb}
    if verb == "bind":
        body.update(binding_id=args.binding_id, minor=args.minor)
    elif verb == "consent":
        body.update(action=args.action, purpose=args.purpose.value)
    elif verb == "location":
        if args.action == "set":
            body.update(action="set", lat=args.lat, lon=args.lon)
        else:
            body.update(action="precision", level=args.level.value)
    return body


def _perform(config: AgentConfig, body: dict[str, Any]) -> dict[str, Any]:
    """Through the daemon's socket if one answers, else on the state directory."""
    sock = config.socket_path
    if sock.exists():
        # A socket left behind by a daemon that is gone does not answer: act directly
        # below, where the state lock says whether a daemon really runs.
        with contextlib.suppress(DaemonUnreachable):
            return control.request(sock, body)
    with as_owner_of(config.state_dir):
        if body["verb"] in READ_ONLY:
            _require_state(config)
        with open_device(config) as core:
            # Said on stderr, so that a script reading stdout gets the same output.
            print(
                f"smartmi-agent: no daemon answered at {sock}; acting on the state "
                f"directory {config.state_dir} directly",
                file=sys.stderr,
            )
            return control.act(core, body, now=time.time())


def _require_state(config: AgentConfig) -> None:
    """A verb that only reads finds a device's state or says where it looked: it never
    makes one (a mistyped ``state_dir`` would otherwise get a new, empty device)."""
    state = config.state_dir
    try:
        if state.exists():
            require_usable(state)  # a problem of ownership or mode first, with its fix
    except OSError as exc:
        raise faults.mapped(exc, state) from exc
    if not (state / "state.db").is_file():
        missing = "does not exist" if not state.exists() else "holds no agent state (state.db)"
        raise ConfigError(
            f"the state directory {state} {missing}: check paths.state_dir in the "
            "--config file (the daemon, or a verb that changes something, makes it on "
            "first use)"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of smartmi-agent."""
    parser = argparse.ArgumentParser(
        prog="smartmi-agent",
        description="Consent-gated data-collection agent of a Smartmi device. Activation data "
        "and crash diagnostics leave the device only while their consent is in force.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="agent.toml (default: %(default)s)"
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="JSON log lines on stderr from this level (default: info for run, "
        "warning for the other verbs)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as text (the default on a terminal) or JSON (the default otherwise)",
    )
    parser.add_argument(
        "--json", action="store_true", help="the verb's result as JSON instead of text"
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    # --config before or after the verb: every verb takes it too.
    common = anywhere("--config", help=f"agent.toml (default: {DEFAULT_CONFIG})")
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS)
    common.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the result as JSON instead of text",
    )
    add = functools.partial(sub.add_parser, parents=[common])
    add("run", help="run the agent daemon (systemd starts this)")
    add("status", help="lifecycle, consent, outbox and quarantine summary")
    add(
        "doctor",
        help="check the configuration, files, permissions, certificate, clock and broker, "
        "and print the fix for each problem (changes nothing)",
    )
    p = add("bind", help="bind the device to an owner")
    p.add_argument("--binding-id", help="the binding's ID (default: generated)")
    p.add_argument(
        "--minor",
        action="store_true",
        help="the owner's account is a minor's: no personal data at all (P5)",
    )
    add("unbind", help="the owner deleted the device: wipe, send a deletion request")
    add("factory-reset", help="factory reset: wipe, send a deletion request")
    add("account-cancelled", help="the owner's account is gone: wipe likewise")
    p = add("consent", help="grant or withdraw a purpose")
    p.add_argument("action", choices=["grant", "withdraw"])
    p.add_argument("purpose", type=_argument(parse_purpose), help="activation or diagnostics")
    p = add("location", help="set the location or its precision")
    loc = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_loc = functools.partial(loc.add_parser, parents=[common])
    q = add_loc("set", help="set the location (coarsened on entry)")
    q.add_argument("lat", type=float)
    q.add_argument("lon", type=float)
    q = add_loc("precision", help="off, country, region (default) or city")
    q.add_argument("level", type=_argument(parse_precision))
    p = add("export", help="the ledger of consent changes and sent messages (JSON)")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    p = add("crash", help="capture crash diagnostics")
    p.add_argument(
        "--simulate",
        action="store_true",
        required=True,
        help="capture a simulated crash (needs diagnostics consent)",
    )
    return parser


def _write_export(path: Path, doc: dict[str, Any]) -> None:
    """Write the export 0600 (it names what was sent); a clear error for a bad path."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name", where="--output")
    if not path.parent.is_dir():
        raise ConfigError(f"the folder {path.parent} does not exist", where="--output")
    try:
        write_private(path, (json.dumps(doc, indent=2) + "\n").encode())
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}", where="--output") from exc


def _doctor(args: argparse.Namespace) -> int:
    """Exit 1 when a check failed; warnings alone leave 0."""
    from agent.runtime import doctor

    findings = doctor.diagnose(Path(args.config))
    try:
        if args.json:
            _print([f.to_json() for f in findings])
        else:
            print(doctor.render(findings))
        sys.stdout.flush()
    except BrokenPipeError:
        return quiet_pipe()
    return 1 if any(f.level == doctor.FAIL for f in findings) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of smartmi-agent."""
    args = build_parser().parse_args(argv)
    level = getattr(
        logging, (args.log_level or ("info" if args.verb == "run" else "warning")).upper()
    )
    log_format = args.log_format or ("text" if sys.stderr.isatty() else "json")
    if args.verb == "doctor":
        return _doctor(args)
    try:
        config: AgentConfig = load_config(Path(args.config))
        if args.verb == "run":
            from agent.runtime import daemon  # the verbs need not import asyncio MQTT

            return daemon.main(config, level=level, log_format=log_format)
        setup_logging(level, log_format)
        result = _perform(config, _request(args))
        failed = False
        if args.verb == "status":
            failed = _identity(config, result)
        if args.verb == "export" and args.output:
            _write_export(Path(args.output), result)
            result = {"exported": args.output, "entries": len(result.get("entries", []))}
        if args.json:
            _print(result)
        else:
            where = {"sock": str(config.socket_path), "state_dir": str(config.state_dir)}
            print(summaries.render(args.verb, result, **where))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler
    except AgentError as exc:
        print(f"smartmi-agent: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return quiet_pipe()
    return 1 if failed else 0


def _identity(config: AgentConfig, result: dict[str, Any]) -> bool:
    """Add the certificate, key and CA problems ``doctor`` would name to a status result
    (``identity``: each with its fix); True if one of them fails."""
    from agent.runtime import doctor  # cryptography's x509 only for status

    found = doctor.identity(config, now=time.time())
    result["identity"] = [f.to_json() for f in found if f.level != doctor.OK]
    return any(f.level == doctor.FAIL for f in found)


if __name__ == "__main__":
    sys.exit(main())
