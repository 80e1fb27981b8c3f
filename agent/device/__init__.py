"""A device: the core's rules carried out on its store, and the hand-off to the transport.

- ``device``: ``Device``, the verbs (bind, grant, withdraw, take a command, capture, ...)
  and what it shows (status, through ``status``).
- ``opening``: ``build_device`` over a store, ``open_device`` over a state directory.
- ``plans``: carrying out the core's plans on the store, failing closed.
- ``wipe``: the wipe protocol (P9).
- ``handoff``: what leaves next, and each item's life after that (``agent.core.items``).
- ``health``: the storage problem in force, and writes that may spend the reserve.
"""

from agent.core.settings import CoreConfig, CrashReport
from agent.device.device import Device
from agent.device.handoff import RETENTION_SWEEP_S, DeviceObserver
from agent.device.opening import build_device, open_device

__all__ = [
    "RETENTION_SWEEP_S",
    "CoreConfig",
    "CrashReport",
    "Device",
    "DeviceObserver",
    "build_device",
    "open_device",
]
