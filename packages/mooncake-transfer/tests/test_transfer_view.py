"""RemoteSegment.view(): direct load/store access to a same-host peer's allocate()d segment.

Real processes: the owner is a subprocess (transfer_peer_proc.py), killed with a real SIGKILL.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal

import pytest
from transfer_peer_proc import pattern

SIZE = 3 * 4096 + 100  # not page aligned: the view must be exactly the segment's length


@pytest.mark.timeout(60)
def test_view_writes_reach_owner_and_survive_owner_kill(engine_factory, peer_factory):
    from mooncake.transfer import TransferError

    eng = engine_factory("view-reader")
    peer = peer_factory("view-owner", alloc=SIZE)
    rseg = eng.open_segment(peer.desc("alloc"))
    assert rseg.transport == "shm"
    view = rseg.view()
    assert isinstance(view, memoryview)
    assert len(view) == SIZE
    assert not view.readonly

    # Write through the view; the owner reads its own memory.
    data = os.urandom(SIZE)
    view[:] = data
    got = peer.request(op="sha", seg="alloc", offset=0, length=SIZE)
    assert got["ok"], got
    assert got["sha"] == hashlib.sha256(data).hexdigest()

    # The owner writes; the view sees it without any transfer call.
    assert peer.request(op="fill", seg="alloc", offset=100, length=5000, seed=7)["ok"]
    assert bytes(view[100:5100]) == pattern(7, 5000)

    # The view keeps the mapping alive on its own (the RemoteSegment object may go).
    del rseg
    gc.collect()
    assert bytes(view[100:5100]) == pattern(7, 5000)

    # kill -9 of the owner: the mapping stays readable and writable, no crash.
    before = bytes(view)
    os.kill(peer.pid, signal.SIGKILL)
    peer.proc.wait(timeout=10)
    assert bytes(view) == before
    view[:4] = b"abcd"
    assert bytes(view[:4]) == b"abcd"
    del view
    gc.collect()

    # A dead owner's segment cannot be opened again.
    with pytest.raises(TransferError):
        eng.open_segment(peer.desc("alloc"), timeout=2.0)


@pytest.mark.timeout(60)
def test_view_needs_the_shm_transport(engine_factory, peer_factory):
    from mooncake.transfer import TransferError

    eng = engine_factory("view-reader2")
    peer = peer_factory("view-owner2", alloc=8192, reg=8192)
    # Registered (not allocate()d) memory is reached over CMA: no mapping to expose.
    reg = eng.open_segment(peer.desc("reg"))
    assert reg.transport != "shm"
    with pytest.raises(TransferError, match=f"transport '{reg.transport}'"):
        reg.view()
    # Forced non-shm transports on an allocate()d segment: same clear error.
    for mode in ("cma", "tcp"):
        seg = eng.open_segment(peer.desc("alloc"), transport=mode)
        assert seg.transport == mode
        with pytest.raises(TransferError, match=f"transport '{mode}'"):
            seg.view()
    # Two views of the same segment share the memory.
    a = eng.open_segment(peer.desc("alloc")).view()
    b = eng.open_segment(peer.desc("alloc")).view()
    a[10:20] = b"0123456789"
    assert bytes(b[10:20]) == b"0123456789"
