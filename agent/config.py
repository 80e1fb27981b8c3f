"""``agent.toml``: the agent's configuration, validated strictly with clear errors.

Example (see ``agent.example.toml``)::

    [device]
    id = "dev-0001"
    serial = "SN0001"
    model = "smartmi.fan.za5"
    firmware_version = "2.1.0"

    [privacy]
    policy_version = "2026-01"

    [paths]
    state_dir = "/var/lib/smartmi-agent"

    [broker]
    url = "mqtts://127.0.0.1:8883"
    ca = "/etc/smartmi-agent/ca.pem"
    cert = "/etc/smartmi-agent/device.pem"
    key = "/etc/smartmi-agent/device.key"
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.core.identity import validate_device_id
from agent.core.rules import CoreConfig
from agent.errors import ConfigError, InvalidDeviceId


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceSection(_Section):
    """What the device is."""

    id: str
    serial: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=64)
    firmware_version: str = Field(min_length=1, max_length=64)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        try:
            return validate_device_id(value)
        except InvalidDeviceId as exc:
            raise ValueError(exc.reason) from None


class PrivacySection(_Section):
    """The privacy policy in force and the outbox bound."""

    policy_version: str = Field(min_length=1, max_length=64)
    outbox_cap: int = Field(default=10_000, ge=1, le=1_000_000)


class PathsSection(_Section):
    """Where the agent keeps its state."""

    state_dir: Path
    crash_dir: Path | None = None
    socket: Path | None = None


class BrokerSection(_Section):
    """How to reach the broker: mutual TLS only, so CA, certificate and key are required."""

    url: str
    # Other nodes of a clustered broker, tried in turn when a connection fails.
    fallback_urls: list[str] = Field(default_factory=list, max_length=16)
    ca: Path
    cert: Path
    key: Path
    protocol: Literal["v5", "v311"] = "v5"
    keepalive: int = Field(default=60, ge=5, le=300)

    @field_validator("url")
    @classmethod
    def _mqtts(cls, value: str) -> str:
        return _mqtts_url(value)

    @field_validator("fallback_urls")
    @classmethod
    def _fallbacks(cls, value: list[str]) -> list[str]:
        return [_mqtts_url(v) for v in value]

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Host and port of ``url``, then of each fallback."""
        return tuple(_host_port(u) for u in (self.url, *self.fallback_urls))

    @property
    def host(self) -> str:
        """The broker's host name or address."""
        return _host_port(self.url)[0]

    @property
    def port(self) -> int:
        """The broker's port (8883 by default)."""
        return _host_port(self.url)[1]


class MetricsSection(_Section):
    """Prometheus metrics of the daemon; off unless this section is given.

    ``listen`` is ``HOST:PORT`` on a loopback address (``127.0.0.1:9108``,
    ``[::1]:9108``, ``localhost:9108``) or ``unix:PATH`` (a socket only the agent's user
    may open). Metrics are counts and states, but they say when a device is used, so
    they are never served beyond the machine.
    """

    listen: str

    @field_validator("listen")
    @classmethod
    def _local(cls, value: str) -> str:
        where = listen_address(value)
        if isinstance(where, Path):
            return value
        host = where[0]
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"{value!r}: metrics are served on a loopback address (127.0.0.1, [::1], "
                "localhost) or a unix: socket only"
            )
        return value


def listen_address(value: str) -> Path | tuple[str, int]:
    """``unix:PATH`` as its path, or ``HOST:PORT`` as the host (IPv6 without its
    brackets) and the port; ValueError naming the problem otherwise."""
    if value.startswith("unix:"):
        if not value.removeprefix("unix:"):
            raise ValueError("unix: needs a socket path, e.g. unix:/run/smartmi-agent/metrics.sock")
        return Path(value.removeprefix("unix:"))
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT with a port from 1 to 65535")
    return host.strip("[]"), int(port)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None  # checked by the validator  # noqa: S101
    return parts.hostname, parts.port or 8883


def mqtts_host_port(url: str) -> tuple[str, int]:
    """Host and port (8883 by default) of an ``mqtts://`` URL; ValueError naming the
    problem if it is not one."""
    return _host_port(_mqtts_url(url))


def _mqtts_url(value: str) -> str:
    """``value`` if it is an ``mqtts://`` URL with a host and a valid port."""
    parts = urlsplit(value)
    if parts.scheme != "mqtts":
        raise ValueError(
            f"{value!r} must be an mqtts:// URL: the agent never speaks plaintext MQTT (P8)"
        )
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r} has a bad port: {exc}") from None
    return value


class AgentConfig(_Section):
    """The whole of agent.toml."""

    device: DeviceSection
    privacy: PrivacySection
    paths: PathsSection
    broker: BrokerSection | None = None
    metrics: MetricsSection | None = None

    @property
    def state_dir(self) -> Path:
        """The state directory."""
        return self.paths.state_dir

    @property
    def own_crash_dir(self) -> Path:
        """Where the agent writes its own crash reports: inside the private state."""
        return self.paths.state_dir / "crash"

    @property
    def crash_dir(self) -> Path:
        """Where other device processes drop crash reports (the agent's own by default)."""
        return self.paths.crash_dir or self.own_crash_dir

    @property
    def crash_dirs(self) -> tuple[Path, ...]:
        """Every directory crash files are collected from, and wiped with the state."""
        return tuple(dict.fromkeys((self.own_crash_dir, self.crash_dir)))

    @property
    def socket_path(self) -> Path:
        """The control socket."""
        return self.paths.socket or self.paths.state_dir / "control.sock"

    def core_config(self) -> CoreConfig:
        """The device core's view of this configuration."""
        return CoreConfig(
            device_id=self.device.id,
            serial=self.device.serial,
            model=self.device.model,
            firmware_version=self.device.firmware_version,
            policy_version=self.privacy.policy_version,
            outbox_cap=self.privacy.outbox_cap,
        )


M = TypeVar("M", bound=BaseModel)


def load_toml(path: Path, model: type[M], *, what: str = "file") -> M:
    """Read a TOML file into ``model``; ConfigError names the file, the key and the problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", where=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=str(path)) from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = [_problem(err, model) for err in exc.errors()]
        raise ConfigError("; ".join(problems), where=str(path)) from exc


def _problem(err: Any, model: type[BaseModel]) -> str:
    """One of pydantic's errors as the file's author fixes it: the key, what is wrong, and
    the key or value meant where one is close."""
    loc, msg = tuple(err["loc"]), err["msg"].removeprefix("Value error, ")
    ctx = err.get("ctx", {})
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # pydantic names the table; the key to fix is the one that picks its kind.
        loc += (ctx["discriminator"].strip("'"),)
        msg = "Field required"
        if err["type"] == "union_tag_invalid":
            msg = f"{ctx['tag']!r} is not one of {ctx['expected_tags']}"
    where, holder, kin = _locate(loc, model)
    problem = f"{where or '<file>'}: {msg}"
    if err["type"] == "extra_forbidden":
        # A key of another kind of the table (another action's) is not a misspelt one.
        owners = [tag for tag, m in kin.items() if loc[-1] in m.model_fields]
        if owners:
            named = ", ".join(owners[:3]) + (f" and {len(owners) - 3} more" if owners[3:] else "")
            takes = "takes" if len(owners) == 1 else "take"
            return f"{problem} ({named} {takes} it, not this one: its keys are {_keys(holder)})"
    close = _did_you_mean(err, holder)
    if close is not None:
        problem += f" (did you mean {close!r}?)"
    elif err["type"] == "extra_forbidden":
        problem += f" (the keys here: {_keys(holder)})"
    return problem


def _keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _locate(
    loc: tuple[int | str, ...], model: type[BaseModel]
) -> tuple[str, type[BaseModel], dict[str, type[BaseModel]]]:
    """Where in the file an error is, the model whose keys are there and, where that is a
    tagged union's member, the union's members by tag. The tag, which pydantic puts in
    ``loc``, is shown after its table: ``events.2 (grant)``."""
    done: list[str] = []  # each table that is a tagged union's member, with its tag
    keys: list[str] = []  # the keys since
    holder, kind, kin = model, typing.cast(Any, model), dict[str, type[BaseModel]]()
    for part in loc:
        kinds = _variants(kind)
        models = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        # A tagged union's tag: the one value of a key (``by``) of one of its members.
        by = next((n for m in models for n, v in _tags(m) if len(models) > 1 and v == part), "")
        if by:
            kin = {v: m for m in models for n, v in _tags(m) if n == by}
            holder = kind = kin[str(part)]
            done.append(f"{'.'.join(keys)} ({part})")
            keys = []
            continue
        keys.append(str(part))
        keyed = [m for m in models if part in m.model_fields]
        if keyed:
            holder, kin = keyed[0], {}
            kind = holder.model_fields[str(part)].annotation
        elif models:  # a key none of them has
            holder, kind = models[0], Any
        else:  # an item of a list, or of a table of its own
            args = typing.get_args(kinds[0]) if len(kinds) == 1 else ()
            kind = args[-1] if args else Any
    return ": ".join([*done, ".".join(keys)] if keys else done), holder, kin


def _variants(kind: Any) -> tuple[Any, ...]:
    """The types a value of ``kind`` may have: Annotated unwrapped, a union's members."""
    while typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return tuple(v for k in typing.get_args(kind) for v in _variants(k))
    return (kind,)


def _tags(model: type[BaseModel]) -> list[tuple[str, Any]]:
    """The keys of ``model`` that have one value only, with it: what can tag it in a union."""
    return [
        (name, typing.get_args(f.annotation)[0])
        for name, f in model.model_fields.items()
        if typing.get_origin(f.annotation) is Literal and len(typing.get_args(f.annotation)) == 1
    ]


def _did_you_mean(err: Any, holder: type[BaseModel]) -> str | None:
    """The key of ``holder``, or the value of a fixed set, closest to a mistyped one; None
    if none is."""
    import difflib  # only for a file with a mistake in it (daemon memory)

    ctx = err.get("ctx", {})
    if err["type"] == "extra_forbidden" and err["loc"]:
        given, choices = str(err["loc"][-1]), set(holder.model_fields)
    elif err["type"] in ("literal_error", "enum") and isinstance(err.get("input"), str):
        given = err["input"]
        choices = set(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
    elif err["type"] == "union_tag_invalid":
        given, choices = ctx["tag"], set(re.findall(r"'([^']*)'", ctx["expected_tags"]))
    else:
        return None
    close = difflib.get_close_matches(given, sorted(choices), n=1)
    return close[0] if close else None


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``path``; ConfigError names the file, the key and the problem."""
    config = load_toml(path, AgentConfig)
    base = path.parent
    # Relative paths are relative to the config file, not to the working directory.
    paths = config.paths.model_copy(
        update={
            k: (base / v if v is not None and not v.is_absolute() else v)
            for k, v in config.paths.model_dump().items()
        }
    )
    broker = config.broker
    if broker is not None:
        broker = broker.model_copy(
            update={
                k: (
                    base / getattr(broker, k)
                    if not getattr(broker, k).is_absolute()
                    else getattr(broker, k)
                )
                for k in ("ca", "cert", "key")
            }
        )
    metrics = config.metrics
    if metrics is not None:
        where = listen_address(metrics.listen)
        if isinstance(where, Path) and not where.is_absolute():
            metrics = MetricsSection(listen=f"unix:{base / where}")
    return config.model_copy(update={"paths": paths, "broker": broker, "metrics": metrics})
