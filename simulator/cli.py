"""``smartmi-sim``: the dev PKI, a local TLS broker, and the fleet simulator."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import installed_version
from agent.core.identity import validate_device_id
from agent.errors import AgentError, ConfigError
from agent.runtime.terminal import anywhere, quiet_pipe

if TYPE_CHECKING:
    pass

DEFAULT_DEV_DIR = Path(os.environ.get("SMARTMI_DEV_DIR", ".smartmi-dev"))


def _pki(args: argparse.Namespace):  # type: ignore[no-untyped-def]  # deferred import
    from simulator.pki import DevPki

    return DevPki(Path(args.dir).resolve() / "pki")


def cmd_pki_init(args: argparse.Namespace) -> int:
    """Create the dev CA, broker and backend identities."""
    from agent.core.identity import MAX_BACKENDS

    if not 0 <= args.backends <= MAX_BACKENDS:
        raise ConfigError(f"--backends must be 0 to {MAX_BACKENDS}, not {args.backends}")
    pki = _pki(args).ensure()
    if args.broker_name:
        pki.issue_server(pki.broker, "localhost", names=args.broker_name)
    print(f"dev PKI ready in {pki.root}")
    print(f"  CA       {pki.ca_cert}")
    print(f"  broker   {pki.broker.cert}")
    print(f"  backend  {pki.backend.cert}")
    for n in range(1, args.backends + 1):
        print(f"  backend consumer {n} (--shard {n}/N)  {pki.backend_consumer(n).cert}")
    return 0


def cmd_pki_device(args: argparse.Namespace) -> int:
    """Issue device certificates."""
    ids: list[str] = list(args.device_id)
    if args.count:
        ids += [f"{args.prefix}{i:05d}" for i in range(args.count)]
    if not ids:
        print("error: name at least one device ID or give --count", file=sys.stderr)
        return 2
    for device_id in ids:
        validate_device_id(device_id)  # refuse the whole batch before writing anything
    pki = _pki(args).ensure()
    if len(ids) == 1 or args.force:
        for device_id in ids:
            ident = pki.issue_device(device_id)
            print(f"{device_id}: {ident.cert} {ident.key}")
    else:
        made = pki.ensure_devices(ids)
        print(f"{len(made)} device identities in {pki.root / 'devices'}")
    return 0


def cmd_agent_config(args: argparse.Namespace) -> int:
    """Write an agent.toml for one dev device (issuing its certificate if needed)."""
    from simulator.dev import write_agent_config

    out = Path(args.output or Path(args.dir) / f"{args.device_id}.toml")
    return write_agent_config(
        _pki(args), args.device_id, out, host=args.host, port=args.port, force=args.force
    )


def cmd_broker_up(args: argparse.Namespace) -> int:
    """Run a local Mosquitto (or a NATS cluster) with the fleet's TLS setup until Ctrl-C."""
    from simulator.dev import broker_up

    return broker_up(
        _pki(args),
        cluster=args.cluster,
        port=args.port,
        bind=args.bind,
        sample_device=args.sample_device,
        cloud=not args.no_cloud,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Run a simulated fleet and check it."""
    from simulator.external import ExternalBroker
    from simulator.outputs import Outputs
    from simulator.run import parse_shard, run
    from simulator.scenario import find_scenario

    # SIGTERM (a CI time limit, `kill`, a service manager) stops the run as Ctrl-C does:
    # the devices stop, what arrived is judged, and the brokers and workers it started
    # are stopped, instead of being left running without it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    outputs = Outputs(
        report=Path(args.report),
        junit=path(args.junit),
        timeline=path(args.timeline),
        capture=path(args.capture),
        received=path(args.received),
        metrics=path(args.metrics),
        html=path(args.html),
    )
    broker = None
    if args.broker:
        broker = ExternalBroker(
            args.broker,
            path(args.ca),
            path(args.cert),
            path(args.key),
            protocol=args.protocol,
            fallbacks=tuple(args.fallback or ()),
            jetstream=tuple(args.jetstream or ()),
        )
    elif args.fallback or args.jetstream:
        raise ConfigError("--fallback and --jetstream go with --broker")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {args.workers} (1 is one process)")
    if args.shard and args.workers:
        raise ConfigError("--shard plays one shard; --workers runs them all: give one of them")
    return run(
        devices=args.devices,
        scenario_path=find_scenario(args.scenario).resolve(),
        dev_dir=Path(args.dir).resolve(),
        outputs=outputs,
        broker=broker,
        seed=args.seed,
        grace_s=args.grace,
        cluster=args.cluster,
        shard=parse_shard(args.shard) if args.shard else (1, 1),
        workers=args.workers or 1,
    )


def cmd_scenarios(args: argparse.Namespace) -> int:
    """List the shipped scenarios, a line each."""
    from simulator.scenario import describe, shipped

    found = shipped()
    width = max(map(len, found), default=0)
    columns = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    for name, path in found.items():
        print(
            textwrap.fill(
                describe(path),
                columns,
                initial_indent=f"{name:<{width}}  ",
                subsequent_indent=" " * (width + 2),
            )
        )
    print("run one with: smartmi-sim run --devices N --scenario NAME (or a file of your own)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Load a scenario file (or a shipped one) and say what it plays, or what is wrong."""
    from simulator.scenario import find_scenario, load_scenario

    path = find_scenario(args.scenario)
    scenario = load_scenario(path)
    sizes = scenario.sizes(args.devices) if args.devices is not None else []
    events = sum(len(g.events) for g in scenario.groups)
    print(
        f"{path}: scenario {scenario.name!r} is valid: {len(scenario.groups)} groups, "
        f"{events} events, {scenario.duration_s:g} s, settle {scenario.settle_s:g} s"
    )
    if sizes:
        groups = ", ".join(f"{g.name} {n}" for g, n in zip(scenario.groups, sizes, strict=True))
        print(f"  with {args.devices} devices: {groups}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Judge a capture against a timeline."""
    from simulator.run import check_capture

    report = Path(args.report) if args.report else None
    return check_capture([Path(t) for t in args.timeline], [Path(c) for c in args.capture], report)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of smartmi-sim."""
    parser = argparse.ArgumentParser(
        prog="smartmi-sim",
        description="Development tools for the Smartmi agent: a dev PKI, a local "
        "mutual-TLS Mosquitto, and a simulated fleet with a cloud-side privacy checker.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    parser.add_argument(
        "--dir",
        default=str(DEFAULT_DEV_DIR),
        help="where the dev PKI and simulator state live (default: %(default)s, "
        "or $SMARTMI_DEV_DIR)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --dir before or after the command: every command takes it too.
    common = anywhere(
        "--dir", help=f"where the dev PKI and simulator state live (default: {DEFAULT_DEV_DIR})"
    )
    add = functools.partial(sub.add_parser, parents=[common])

    pki = add("pki", help="dev CA, broker, backend and device certificates")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="PKI_COMMAND")
    add_pki = functools.partial(pki_sub.add_parser, parents=[common])
    p = add_pki("init", help="create the dev CA, broker and backend identities")
    p.add_argument(
        "--backends",
        type=int,
        default=0,
        metavar="N",
        help="also issue backend consumers 1 to N (one per --shard of a fleet)",
    )
    p.add_argument(
        "--broker-name",
        action="append",
        metavar="NAME",
        help="re-issue the broker's certificate for this host name or address too, so "
        "other hosts can reach it (repeatable)",
    )
    p.set_defaults(func=cmd_pki_init)
    p = add_pki("device", help="issue device certificates (CN = device ID)")
    p.add_argument("device_id", nargs="*", help="device IDs to issue")
    p.add_argument("--count", type=int, default=0, help="also issue this many numbered IDs")
    p.add_argument("--prefix", default="sim-", help="prefix of numbered IDs (default %(default)s)")
    p.add_argument("--force", action="store_true", help="re-issue even if a certificate exists")
    p.set_defaults(func=cmd_pki_device)

    p = add("run", help="a simulated fleet and the cloud-side privacy checker")
    p.add_argument("--devices", type=int, required=True, help="how many simulated devices")
    p.add_argument(
        "--scenario",
        required=True,
        help="a scenario file, or a shipped scenario's name (smartmi-sim scenarios lists them)",
    )
    _add_output_options(p)
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument(
        "--grace",
        type=float,
        help="override the scenario's grace_s: how late a cloud choice may reach a device "
        "or a message on the wire the broker (a large fleet in one process is slower)",
    )
    p.add_argument("--broker", help="an mqtts:// broker to use instead of a local Mosquitto")
    p.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="run against a local N-node NATS cluster (MQTT 3.1.1) instead of Mosquitto",
    )
    p.add_argument("--ca", help="with --broker: the CA that signed the broker's certificate")
    p.add_argument("--cert", help="with --broker: the backend's certificate")
    p.add_argument("--key", help="with --broker: the backend's key")
    _add_scale_options(p)
    p.set_defaults(func=cmd_run)

    p = add(
        "check",
        help="judge a capture (mosquitto_sub -F '%%U %%t %%x') against a timeline file",
    )
    p.add_argument(
        "--timeline",
        required=True,
        action="append",
        help="the ground truth (smartmi-sim run --timeline); repeat it for each shard",
    )
    p.add_argument(
        "--capture",
        required=True,
        action="append",
        help="what an observer at the broker (or a shard's backend, --received) received; "
        "repeat it for each",
    )
    p.add_argument("--report", help="also write the verdict as JSON here")
    p.set_defaults(func=cmd_check)

    p = add("agent-config", help="write an agent.toml for a dev device")
    p.add_argument("device_id", help="the device ID (its certificate is issued if missing)")
    p.add_argument("-o", "--output", help="where to write (default: DIR/DEVICE_ID.toml)")
    p.add_argument("--host", default="127.0.0.1", help="broker host (default %(default)s)")
    p.add_argument("--port", type=int, default=8883, help="broker port (default %(default)s)")
    p.add_argument("--force", action="store_true", help="rewrite an existing file")
    p.set_defaults(func=cmd_agent_config)

    _add_broker_parser(add("broker", help="a local Mosquitto or NATS cluster"), common)
    _add_scenario_parsers(add)
    return parser


def _add_scenario_parsers(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """``smartmi-sim scenarios`` and ``smartmi-sim validate``."""
    p = add_parser("scenarios", help="list the shipped scenarios, a line each")
    p.set_defaults(func=cmd_scenarios)
    p = add_parser("validate", help="check a scenario file without running it")
    p.add_argument("scenario", help="a scenario file, or a shipped scenario's name")
    p.add_argument("--devices", type=int, help="also show how N devices split into its groups")
    p.set_defaults(func=cmd_validate)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """What ``run`` writes: all checked before the fleet starts."""
    p.add_argument("--report", default="report.json", help="JSON report (default %(default)s)")
    p.add_argument("--junit", help="also write JUnit XML here (one case per privacy rule)")
    p.add_argument(
        "--metrics",
        help="also write the agents' metrics at the end here, summed over the fleet, in the "
        "Prometheus text format (the daemon's [metrics] families)",
    )
    p.add_argument(
        "--html",
        help="also write the report as one self-contained page: summary, connected devices "
        "and messages over time, latency distribution, violations on the timeline",
    )
    p.add_argument("--timeline", help="also write the run's ground truth here (for check)")
    p.add_argument(
        "--capture",
        help="also capture every uplink as an observer (mosquitto_sub) into this file, "
        "and judge it apart from the backend",
    )


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    """``run``'s options for fleets on every core and on many hosts."""
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run the fleet as N processes (shards) against one local broker, judged together",
    )
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="play only shard K of N (every Nth device), as backend consumer K; with "
        "--timeline and --received, for smartmi-sim check to judge all shards together",
    )
    p.add_argument("--received", help="write what this run's backend received (a capture)")
    p.add_argument(
        "--protocol",
        choices=("v5", "v311"),
        default="v5",
        help="with --broker: the MQTT version (v311 for a NATS cluster)",
    )
    p.add_argument(
        "--fallback",
        action="append",
        metavar="URL",
        help="with --broker: another node of a cluster on the same host (repeatable)",
    )
    p.add_argument(
        "--jetstream",
        action="append",
        metavar="URL",
        help="with --broker on a NATS cluster: a node's NATS port (tls://HOST:PORT, "
        "repeatable); the backend reads the uplink from JetStream there, with the time "
        "the broker stored each message, instead of subscribing over MQTT",
    )


def _add_broker_parser(broker: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """``smartmi-sim broker up``."""
    b_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="BROKER_COMMAND")
    p = b_sub.add_parser(
        "up", parents=[common], help="start Mosquitto (mutual TLS) from broker-config/ until Ctrl-C"
    )
    p.add_argument(
        "--port",
        type=int,
        default=8883,
        help="TCP port (default %(default)s; 0 = any); with --cluster, the first node's",
    )
    p.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="an N-node NATS cluster (MQTT 3.1.1, JetStream) instead of Mosquitto",
    )
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--sample-device", default="dev-0001", help="device identity to print")
    p.add_argument(
        "--no-cloud",
        action="store_true",
        help="no dev cloud: nothing answers command syncs, so agents hold personal data",
    )
    p.set_defaults(func=cmd_broker_up)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of smartmi-sim."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "port", None) == 0:
        args.port = None
    try:
        rc: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler
    except AgentError as exc:
        print(f"smartmi-sim: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return quiet_pipe()
    except KeyboardInterrupt:  # outside a fleet's own handling, e.g. while issuing the PKI
        print("smartmi-sim: interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
