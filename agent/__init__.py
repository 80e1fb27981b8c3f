"""The Smartmi device-side data-collection agent."""

from __future__ import annotations

import importlib.metadata


def installed_version() -> str:
    """The installed package's version (``unknown`` when run from an uninstalled tree)."""
    try:
        return importlib.metadata.version("smartmi-agent")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
