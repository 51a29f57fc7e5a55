"""Fixtures of the mooncake-transfer tests (helpers live in transfer_testlib.py)."""

from __future__ import annotations

import pytest
from transfer_testlib import PeerProc


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long or large tests (excluded from the quick CI subset)"
    )
    config.addinivalue_line("markers", "netns: needs root and `ip netns` to build test hosts")


@pytest.fixture
def peer_factory():
    procs = []

    def make(name: str, **kw) -> PeerProc:
        p = PeerProc(name, **kw)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.close()


@pytest.fixture
def engine_factory():
    from mooncake.transfer import TransferEngine

    engines = []

    def make(name=None, **kw) -> TransferEngine:
        e = TransferEngine(name, **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()
