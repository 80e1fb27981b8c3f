"""The one exception tree of the agent and its tools.

Every error the project raises on purpose is an ``AgentError``. Library errors
(ssl, sqlite3, paho, pydantic, cryptography) are translated at the adapter that
calls the library, with ``raise ... from exc`` so the cause stays visible.
Exceptions carry data (reason code, purpose, item id) as attributes, not only text::

    AgentError
    ├── ConfigError            bad agent.toml, scenario file or CLI argument (where, what)
    ├── IdentityError          device identity unusable
    │   └── InvalidDeviceId    an ID that could act as an MQTT wildcard or path
    ├── SchemaError            a payload or command failed its strict schema (P12)
    ├── ConsentError
    │   └── ConsentNotInForce  capture/send refused: purpose and reason (P1, P2, P5, P6, P13)
    ├── CommandRejected        a cloud command was refused: command_id and reason
    ├── UnsafePermissions      a key or the state directory is open to others (path, fix)
    ├── StorageError           the local store cannot be used: kind full, read-only,
    │   │                      corrupt, io or other
    │   ├── StoreLocked        another process holds the state directory
    │   └── TamperedRecord     a record failed authentication: table, row id
    ├── LifecycleError
    │   └── IllegalTransition  an event not allowed in the current state
    ├── TransportError         MQTT/TLS problems, mapped from ssl/paho
    │   ├── CertificateProblem expired, not yet valid, unknown CA (kind)
    │   └── PublishRefused     the broker refused a PUBLISH: msg_id, reason code
    ├── ControlError           the local control socket or CLI could not act
    │   └── DaemonUnreachable  no daemon answers on the control socket
    └── DevToolError           the simulator's developer tools
        ├── PkiError           dev CA / certificate generation
        └── BrokerError        starting or stopping the local Mosquitto
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the project raises on purpose."""


class ConfigError(AgentError):
    """A configuration, scenario file or argument is invalid; ``where`` names it."""

    def __init__(self, message: str, *, where: str = "") -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class IdentityError(AgentError):
    """The device identity (ID, certificate, key) is unusable."""


class InvalidDeviceId(IdentityError, ValueError):
    """A device ID that is empty, too long, or could act as an MQTT wildcard or path."""

    def __init__(self, device_id: str, reason: str) -> None:
        self.device_id = device_id
        self.reason = reason
        super().__init__(f"invalid device ID {device_id!r}: {reason}")


class SchemaError(AgentError, ValueError):
    """A payload or command does not match its strict schema (P12)."""

    def __init__(self, message: str, *, schema: str = "") -> None:
        self.schema = schema
        super().__init__(f"{schema}: {message}" if schema else message)


class ConsentError(AgentError):
    """Base for consent problems."""


class ConsentNotInForce(ConsentError):
    """An item may not be captured or sent: no consent in force for its purpose."""

    def __init__(self, purpose: str, reason: str) -> None:
        self.purpose = purpose
        self.reason = reason
        super().__init__(f"no consent in force for {purpose!r}: {reason}")


class CommandRejected(AgentError):
    """A cloud command was refused; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "", *, command_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.command_id = command_id
        text = f"command rejected ({reason})"
        if command_id:
            text += f" id={command_id}"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class UnsafePermissions(AgentError):
    """A private key, data key or the state directory is open to other users."""

    def __init__(self, path: object, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path} {problem}; refusing to use it. Fix: {fix}")


class StorageError(AgentError):
    """The local encrypted store cannot be used; ``kind`` says how (``StorageKind``).

    ``full``: no space left; ``read-only``: the file system or the files refuse writes;
    ``corrupt``: the database file is damaged; ``io``: the device failed a read or
    write; ``other``: anything else (locked, misconfigured).
    """

    def __init__(self, message: str, *, kind: str = "other") -> None:
        self.kind = kind
        super().__init__(message)


class StoreLocked(StorageError):
    """Another process (usually the daemon) holds the state directory lock."""


class TamperedRecord(StorageError):
    """A stored record failed authentication (bit flip, truncation, swapped row)."""

    def __init__(self, table: str, row_id: object, reason: str = "authentication failed") -> None:
        self.table = table
        self.row_id = row_id
        self.reason = reason
        super().__init__(f"record {table}/{row_id} rejected: {reason}")


class LifecycleError(AgentError):
    """Base for lifecycle problems."""


class IllegalTransition(LifecycleError):
    """The lifecycle machine has no transition for this event in this state."""

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f"event {event!r} is not allowed in state {state!r}")


class TransportError(AgentError):
    """An MQTT or TLS problem talking to the broker."""


class NotSent(TransportError):
    """The MQTT client took nothing to send (not connected, or it refused the message):
    the broker cannot have it."""


class CertificateProblem(TransportError):
    """The TLS handshake failed because of a certificate; ``kind`` says which way."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"certificate problem ({kind}): {detail}")


class PublishRefused(TransportError):
    """The broker answered a PUBLISH with a failure reason code (MQTT v5 §3.4.2.1)."""

    def __init__(self, msg_id: str, reason_code: int, reason: str) -> None:
        self.msg_id = msg_id
        self.reason_code = reason_code
        self.reason = reason
        super().__init__(f"broker refused {msg_id}: {reason} (0x{reason_code:02x})")


class ControlError(AgentError):
    """The control socket or the CLI could not carry out a request."""


class DaemonUnreachable(ControlError):
    """Nothing answers on the control socket (no daemon, or one that died)."""


class DevToolError(AgentError):
    """Base for the simulator's developer tools."""


class PkiError(DevToolError):
    """The dev PKI could not create or load a certificate."""


class BrokerError(DevToolError):
    """The local Mosquitto could not be started, reached or stopped."""
