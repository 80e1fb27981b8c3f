"""The MQTT adapter: the one package that imports paho-mqtt or aiomqtt.

Everything else talks to the broker through ``connect`` and the ``Connection`` it
yields, and sees only our own types and the exception tree of ``agent.errors``:
paho's and aiomqtt's errors are translated here (``raise ... from``). Its modules:
``options`` (how a connection is opened: ``Options``, paho's log, aiomqtt's
arguments), ``client`` (aiomqtt's client as we run it) and ``connection``
(``connect`` and ``Connection``).

Read from paho-mqtt 2.2.0 and aiomqtt 2.5.1 (``READ_FROM``). Where the adapter leans
on their internals it says so at the line, and these are the only such places:

* aiomqtt's ``_on_publish`` is overridden (``client.Client``) to take every PUBACK
  with its reason code (aiomqtt's own ``publish`` drops it, and slows down as calls
  pile up), its ``_on_message`` to hand each incoming message to ``connect``'s
  ``on_message`` as the socket is read (when one is given), its ``_disconnected``
  future says why a connection broke, ends the waits for PUBACKs and is what
  ``Connection.ended`` awaits, its ``_queue`` of incoming messages is drained at
  once after each one its iterator gives (``Connection.incoming``), and its reader
  of the socket (``_on_socket_open``) is replaced by one that reads up to
  ``READ_BURST`` packets while bytes wait (``Connection.read_waiting`` reads the
  same way);
* paho's ``_reset_sockets`` closes a socket that a failed handshake left open
  (paho has no public close; ``connect``);
* paho's public ``on_socket_register_write`` hook, which aiomqtt sets, is replaced
  (``client.register_write_safely``) by one that checks, when the loop gets to it,
  that the socket is still open and paho still has something to write: aiomqtt's
  own adds the writer later, when paho may already have written everything and
  dropped its registration, so the writer is never removed, spins, and outlives the
  socket (its file descriptor reused by another connection).
"""

from __future__ import annotations

from typing import Final

from agent.runtime.mqtt.client import Incoming, PubAck
from agent.runtime.mqtt.connection import Connection, connect
from agent.runtime.mqtt.options import LastErrorLog, Options

# The versions this package was read from (its internals): pyproject.toml pins these.
READ_FROM: Final = {"aiomqtt": "2.5.1", "paho-mqtt": "2.2.0"}

__all__ = ["READ_FROM", "Connection", "Incoming", "LastErrorLog", "Options", "PubAck", "connect"]
