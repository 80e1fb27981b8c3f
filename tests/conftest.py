"""Session-wide fixtures: a dev PKI made for this test session and a real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from simulator.broker import MosquittoBroker
from simulator.pki import DevPki

# The suite's verdict is the same every run: property tests draw the same examples each
# time. `--hypothesis-profile=explore` draws new ones (and more of them) to look for cases
# the suite's examples miss; a case it finds goes into the test as an explicit example.
settings.register_profile("suite", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("suite")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """A dev CA, broker and backend identity made for this session."""
    return DevPki(tmp_path_factory.mktemp("pki")).ensure()


@pytest.fixture(scope="session")
def broker(pki: DevPki) -> Iterator[MosquittoBroker]:
    """A real Mosquitto from broker-config/ on a free loopback port, shared by the session."""
    with MosquittoBroker(pki, connection_messages=True) as b:
        yield b


@pytest.fixture
def own_broker(pki: DevPki) -> Iterator[MosquittoBroker]:
    """A Mosquitto of this test's own, for tests that restart or kill it."""
    with MosquittoBroker(pki, connection_messages=True) as b:
        yield b


@pytest.fixture
def foreign_pki(tmp_path: Path) -> DevPki:
    """A second, unrelated dev CA."""
    return DevPki(tmp_path / "foreign").ensure()
