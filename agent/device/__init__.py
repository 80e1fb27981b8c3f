"""A device: the core's rules carried out on its store, and the hand-off to the transport.

- ``device``: ``Device``, the verbs (bind, grant, withdraw, take a command, capture, ...),
  what it shows (status), and ``open_device``.
- ``plans``: carrying out the core's plans on the store, failing closed.
- ``wipe``: the wipe protocol (P9).
- ``handoff``: what leaves next, and each item's life after that (``agent.core.items``).
- ``health``: the storage problem in force, and writes that may spend the reserve.
"""

from agent.core.settings import CoreConfig, CrashReport
from agent.device.device import Device, open_device
from agent.device.handoff import RETENTION_SWEEP_S, DeviceObserver

__all__ = [
    "RETENTION_SWEEP_S",
    "CoreConfig",
    "CrashReport",
    "Device",
    "DeviceObserver",
    "open_device",
]
