"""Fixtures for end-to-end tests: a backend connected to the session broker, agent factories."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from simulator.broker import MosquittoBroker
from simulator.cloud import Cloud
from simulator.pki import DevPki
from simulator.rig import Agent


@pytest_asyncio.fixture
async def cloud(broker: MosquittoBroker, pki: DevPki) -> AsyncIterator[Cloud]:
    """The backend, subscribed to every up/ on the session broker."""
    async with Cloud(broker.host, broker.port, pki).connected() as c:
        yield c


@pytest.fixture
def make_agent(
    tmp_path: Path, broker: MosquittoBroker, pki: DevPki, request: pytest.FixtureRequest
) -> Callable[..., Agent]:
    """Build agents with IDs unique to this test."""
    base = request.node.name.replace("[", "-").replace("]", "")[-40:].lstrip("-_")
    counter = iter(range(1000))

    def make(**kw: object) -> Agent:
        n = next(counter)
        device_id = f"{base}-{n}".replace("_", "-")
        return Agent(root=tmp_path / f"agent{n}", device_id=device_id, broker=broker, pki=pki, **kw)  # type: ignore[arg-type]

    return make
