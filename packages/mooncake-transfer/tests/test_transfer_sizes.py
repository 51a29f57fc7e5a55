"""Acceptance 3: two processes on one host, write and read byte-exact over tcp, cma and shm."""

from __future__ import annotations

import hashlib
import os

import pytest
from transfer_peer_proc import pattern
from transfer_testlib import LocalBuf

from mooncake.transfer import TransferStatus

KiB, MiB = 1024, 1024 * 1024
SIZES = [1, 4 * KiB, 1 * MiB, 64 * MiB]
OFFSET = 7  # unaligned on purpose
# shm works on engine-allocated (memfd) segments, cma on registered memory; tcp is tried on both.
CASES = [("tcp", "reg"), ("tcp", "alloc"), ("cma", "reg"), ("shm", "alloc")]


def _roundtrip(engine_factory, peer_factory, transport, which, sizes):
    seg_len = max(sizes) + OFFSET + 64
    peer = peer_factory(f"owner-{transport}-{which}", **{which: seg_len})
    eng = engine_factory(f"init-{transport}-{which}", transport=transport)
    rseg = eng.open_segment(peer.desc(which))
    assert rseg.transport == transport
    assert rseg.peer == peer.name
    assert rseg.length == seg_len
    buf = LocalBuf(max(sizes))
    for size in sizes:
        # write: our random bytes land exactly in the peer's segment
        data = os.urandom(size)
        buf.fill(data)
        eng.write(rseg, OFFSET, buf.addr, size, timeout=60)
        got = peer.request(op="sha", seg=which, offset=OFFSET, length=size)
        assert got["sha"] == hashlib.sha256(data).hexdigest(), (transport, size)
        # read: the peer fills a region, we read it back
        seed = size * 31 + 5
        r = peer.request(op="fill", seg=which, offset=OFFSET, length=size, seed=seed)
        assert r["ok"], r
        buf.fill(b"\0" * size)
        eng.read(rseg, OFFSET, buf.addr, size, timeout=60)
        assert buf.bytes(0, size) == pattern(seed, size), (transport, size)
        # async form of both
        h = eng.submit([("write", rseg, OFFSET, buf.addr, size)])
        assert h.wait(60) == TransferStatus.DONE
        assert h.error is None


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("transport", "which"), CASES)
def test_write_read_exact(engine_factory, peer_factory, transport, which):
    _roundtrip(engine_factory, peer_factory, transport, which, SIZES)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("transport", "which"), [("tcp", "reg"), ("cma", "reg"), ("shm", "alloc")])
def test_write_read_256mib(engine_factory, peer_factory, transport, which):
    _roundtrip(engine_factory, peer_factory, transport, which, [256 * MiB])
