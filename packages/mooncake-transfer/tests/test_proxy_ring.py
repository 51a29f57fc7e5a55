"""Host proxy ring (issue 15, acceptance 1): descriptor format, data before signal, wrap-around
and back-pressure, drop on a dead peer, stop() while busy, membership epochs of signals and
puts left in flight by stop(). A host thread stands in for the GPU
producer; receivers are real processes reached over shared memory, cross-memory attach or TCP."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import threading
import time

import pytest
from proxy_testlib import ProxyPeer, fill_regions, make_regions

from mooncake.transfer import PeerState, TransferError, TransferTimeout
from mooncake.transfer._engine import PROXY_SIGNAL_TAG
from mooncake.transfer.proxy import (
    PROXY_PUT,
    PROXY_PUT_VALUE,
    PROXY_SIGNAL,
    PROXY_SIGNAL_ADD,
    HostProxy,
    ProxyRing,
    ProxySignalApplier,
    proxy_layout,
    wait_word,
)

MiB = 1024 * 1024
SEG = 16 * MiB


@pytest.fixture
def proxy_peers():
    peers = []

    def make(name: str, **kw) -> ProxyPeer:
        p = ProxyPeer(name, **kw)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


def _pairs(regions, peer=0, sig_offset=0):
    """PUT region i, then SIGNAL the word with i + 1 (src offset == dst offset)."""
    out = []
    for i, (off, size, _) in enumerate(regions):
        out.append((PROXY_PUT, peer, off, off, size))
        out.append((PROXY_SIGNAL, peer, sig_offset, i + 1, 0))
    return out


# ---- (a) format ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_descriptor_and_header_layout():
    lay = proxy_layout()
    assert lay["desc_size"] == 32
    assert lay["desc_align"] == 32
    assert lay["desc_offsets"] == {
        "dst_offset": 0,
        "src": 8,
        "len": 16,
        "peer": 20,
        "op": 22,
        "flags": 23,
        "seq": 24,
    }
    assert lay["header_size"] == 384
    assert lay["header_offsets"] == {"head": 64, "tail": 128, "retired": 192, "closed": 256}
    assert lay["signal_msg_size"] == 32
    assert lay["signal_msg_offsets"] == {
        "magic": 0,
        "op": 4,
        "epoch": 6,
        "seg_id": 8,
        "offset": 16,
        "value": 24,
    }
    assert lay["signal_magic"] == int.from_bytes(b"SIG2", "little")
    assert (PROXY_PUT, PROXY_PUT_VALUE, PROXY_SIGNAL, PROXY_SIGNAL_ADD) == (1, 2, 3, 4)
    r = ProxyRing(16, 3)
    # header, completed[3] + dropped[3] rounded to 64 bytes, 16 slots of 32 bytes
    assert r.nbytes == 384 + 64 + 16 * 32
    assert r.addr % 4096 == 0
    assert (r.head, r.tail, r.retired, r.closed) == (0, 0, 0, False)
    assert r.completed() == [0, 0, 0]
    assert r.dropped() == [0, 0, 0]


@pytest.mark.timeout(30)
def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="capacity must be a power of two"):
        ProxyRing(12, 1)
    with pytest.raises(ValueError, match="capacity"):
        ProxyRing(1, 1)
    with pytest.raises(ValueError, match="num_peers must be in"):
        ProxyRing(8, 0)
    r = ProxyRing(8, 1)
    with pytest.raises(ValueError, match="op must be"):
        r.post(9, 0, 0)
    with pytest.raises(ValueError, match="peer must be in"):
        r.post(PROXY_PUT, 70000, 0)
    with pytest.raises(ValueError, match="length must be in"):
        r.post(PROXY_PUT, 0, 0, 0, 1 << 33)
    with pytest.raises(ValueError, match=r"descs\[1\]: dst_offset must be >= 0"):
        r.post_many([(PROXY_PUT, 0, 0, 0, 1), (PROXY_PUT, 0, -1, 0, 1)])
    assert r.head == 0  # nothing was posted


# ---- (b) data before signal ---------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("transport", "which"), [("shm", "alloc"), ("tcp", "alloc"), ("cma", "reg")]
)
def test_put_then_signal_data_is_complete_when_signal_seen(
    engine_factory, proxy_peers, transport, which
):
    """The receiver polls the signal word; whenever it sees a new value v, regions < v must
    already be byte-exact. Random sizes, including ones the engine copies asynchronously."""
    peer = proxy_peers(f"pxo-{transport}", **{which: SEG})
    eng = engine_factory(f"pxs-{transport}")
    rseg = eng.open_segment(peer.desc(which), transport=transport)
    assert rseg.transport == transport
    local = eng.allocate(SEG)
    ring = ProxyRing(256, 1)
    proxy = HostProxy(eng, ring, local, [rseg])
    proxy.start()
    try:
        total = 0
        for rnd in range(2):
            regions = make_regions(seed=rnd + 7, count=150, limit=SEG)
            fill_regions(local.view(), regions)
            sig = 8 * rnd  # one signal word per round (regions start at byte 64)
            peer.send_only(op="verify", seg=which, sig_offset=sig, regions=regions, timeout=60)
            posted, why, _ = ring.post_many(_pairs(regions, 0, sig), timeout=10)
            assert (posted, why) == (2 * len(regions), "posted")
            reply = peer.read_reply(90)
            assert reply["ok"], reply
            assert reply["verified"] == len(regions)
            assert reply["mismatches"] == [], f"a signal overtook its data: {reply}"
            total += 2 * len(regions)
        assert ring.quiet(ring.head - 1, 10)
        st = proxy.stats()
        assert (st["completed"], st["dropped"]) == ([total], [0]), st
        assert st["invalid"] == 0
        if transport == "shm":
            assert st["signals_shm"] > 0
            assert st["signals_notify"] == 0
        else:
            assert st["signals_notify"] > 0
            assert st["signals_shm"] == 0
    finally:
        proxy.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_signal_add_and_put_value(engine_factory, proxy_peers, transport):
    """SIGNAL_ADD accumulates, PUT_VALUE lands 8 bytes before a later signal to the same peer."""
    peer = proxy_peers(f"pxa-{transport}", alloc=MiB)
    eng = engine_factory(f"pxas-{transport}")
    rseg = eng.open_segment(peer.desc("alloc"), transport=transport)
    local = eng.allocate(4096)
    ring = ProxyRing(64, 1)
    with HostProxy(eng, ring, local, [rseg]) as proxy:
        descs = []
        for i in range(200):
            descs.append((PROXY_PUT_VALUE, 0, 4096 + 8 * i, 0xABCD0000 + i, 0))
            descs.append((PROXY_SIGNAL_ADD, 0, 8, 3, 0))
        assert ring.post_many(descs, timeout=10)[:2] == (400, "posted")
        assert ring.quiet(ring.head - 1, 20)
        reply = peer.request(op="wait_word", seg="alloc", offset=8, minimum=600, timeout=10)
        assert reply["value"] == 600, reply
        rview = rseg.view() if transport == "shm" else None
        if rview is not None:
            vals = [
                int.from_bytes(rview[4096 + 8 * i : 4104 + 8 * i], "little") for i in range(200)
            ]
            assert vals == [0xABCD0000 + i for i in range(200)]
        assert proxy.stats()["completed"] == [400]


# ---- (c) wrap-around and back-pressure -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_full_ring_back_pressure_then_wrap_around(engine_factory, proxy_peers):
    peer = proxy_peers("pxw", alloc=SEG)
    eng = engine_factory("pxws")
    rseg = eng.open_segment(peer.desc("alloc"))
    local = eng.allocate(SEG)
    ring = ProxyRing(8, 1)
    # No consumer yet: 8 fit, the 9th waits for room and gives up at its deadline, ticketless.
    for _ in range(8):
        ring.post(PROXY_SIGNAL_ADD, 0, 8, 1, 0, timeout=0.1)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="stayed full"):
        ring.post(PROXY_SIGNAL_ADD, 0, 8, 1, 0, timeout=0.3)
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 3.0, waited
    assert (ring.head, ring.tail) == (8, 0)
    posted, why, _ = ring.post_many([(PROXY_SIGNAL_ADD, 0, 8, 1, 0)], timeout=0.05)
    assert (posted, why) == (0, "full")

    proxy = HostProxy(eng, ring, local, [rseg])
    proxy.start()
    try:
        # A producer blocked on a full ring proceeds once the consumer frees slots.
        assert (
            peer.request(op="wait_word", seg="alloc", offset=8, minimum=8, timeout=10)["value"] == 8
        )
        # Ordering survives many laps of an 8-slot ring.
        regions = make_regions(seed=3, count=400, limit=SEG, small=16 * 1024, big_share=0.02)
        fill_regions(local.view(), regions)
        peer.send_only(op="verify", seg="alloc", sig_offset=0, regions=regions, timeout=60)
        posted, why, _ = ring.post_many(_pairs(regions), timeout=10)
        assert (posted, why) == (2 * len(regions), "posted")
        reply = peer.read_reply(90)
        assert (reply["ok"], reply["mismatches"]) == (True, []), reply
        assert ring.quiet(ring.head - 1, 10)
        assert ring.head == ring.tail == ring.retired == 8 + 2 * len(regions)
        assert ring.head > 50 * ring.capacity  # wrapped many times
        assert proxy.stats()["completed"] == [8 + 2 * len(regions)]
    finally:
        proxy.stop()


@pytest.mark.timeout(60)
def test_bad_descriptors_are_dropped_not_fatal(engine_factory, proxy_peers):
    peer = proxy_peers("pxb", alloc=MiB)
    eng = engine_factory("pxbs")
    rseg = eng.open_segment(peer.desc("alloc"))
    local = eng.allocate(4096)
    ring = ProxyRing(16, 1)
    with HostProxy(eng, ring, local, [rseg]) as proxy:
        ring.post(PROXY_PUT, 0, 0, 4000, 200)  # src past the local segment
        ring.post(PROXY_PUT, 0, MiB - 10, 0, 100)  # dst past the peer's segment
        ring.post(PROXY_SIGNAL, 0, 12, 1, 0)  # unaligned signal word
        ring.post(PROXY_SIGNAL, 3, 0, 1, 0)  # no such peer
        ring.post(PROXY_SIGNAL_ADD, 0, 16, 5, 0)  # a good one still goes through
        assert ring.quiet(ring.head - 1, 10)
        st = proxy.stats()
        assert (st["invalid"], st["dropped"], st["completed"]) == (4, [3], [1]), st
        assert "not in [0, 1)" in st["last_drop"], st
        assert (
            peer.request(op="wait_word", seg="alloc", offset=16, minimum=5, timeout=5)["value"] == 5
        )


# ---- (d) a dead peer ----------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_kill9_peer_descriptors_dropped_live_peer_drains(engine_factory, proxy_peers, transport):
    live = proxy_peers(f"pxlive-{transport}", alloc=SEG)
    doomed = proxy_peers(f"pxdoomed-{transport}", alloc=SEG)
    eng = engine_factory(f"pxks-{transport}")
    rl = eng.open_segment(live.desc("alloc"), transport=transport)
    rd = eng.open_segment(doomed.desc("alloc"), transport=transport)
    local = eng.allocate(SEG)
    ring = ProxyRing(64, 2)
    proxy = HostProxy(eng, ring, local, [rl, rd], op_timeout=5.0)
    proxy.start()
    try:
        first = make_regions(seed=11, count=40, limit=SEG // 2)
        fill_regions(local.view(), first)
        for p in (live, doomed):
            p.send_only(op="verify", seg="alloc", sig_offset=0, regions=first, timeout=30)
        descs = _pairs(first, 0) + _pairs(first, 1)
        assert ring.post_many(descs, timeout=10)[:2] == (len(descs), "posted")
        for p in (live, doomed):
            r = p.read_reply(60)
            assert (r["ok"], r["mismatches"]) == (True, []), r

        doomed.kill9()
        deadline = time.monotonic() + 10
        while eng.peer_state(doomed.name) != PeerState.DEAD:
            assert time.monotonic() < deadline, "the kill was not detected"
            time.sleep(0.01)

        second = make_regions(seed=12, count=60, limit=SEG, start=SEG // 2)
        fill_regions(local.view(), second)
        # Interleave: every descriptor to the dead peer sits between ones to the live peer.
        live.send_only(op="verify", seg="alloc", sig_offset=8, regions=second, timeout=60)
        to_live, to_dead = _pairs(second, 0, 8), _pairs(second, 1, 8)
        descs = [d for pair in zip(to_live, to_dead) for d in pair]
        t0 = time.monotonic()
        assert ring.post_many(descs, timeout=10)[:2] == (len(descs), "posted")
        assert ring.quiet(ring.head - 1, 10)
        elapsed = time.monotonic() - t0
        r = live.read_reply(60)
        assert (r["ok"], r["mismatches"], r["verified"]) == (True, [], len(second)), r
        st = proxy.stats()
        assert st["dropped"] == [0, len(to_dead)], st
        assert st["completed"] == [2 * len(first) + len(to_live), 2 * len(first)], st
        assert "dead" in st["last_drop"]
        assert elapsed < 10, f"draining past a dead peer took {elapsed:.2f} s"
    finally:
        t0 = time.monotonic()
        proxy.stop()
        assert time.monotonic() - t0 < 5


# ---- (e) stop() while busy ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_stop_while_busy(engine_factory, proxy_peers):
    peer = proxy_peers("pxstop", alloc=SEG)
    eng = engine_factory("pxstops")
    rseg = eng.open_segment(peer.desc("alloc"), transport="tcp")  # slow path: stays busy
    local = eng.allocate(SEG)
    ring = ProxyRing(1024, 1)
    proxy = HostProxy(eng, ring, local, [rseg])
    proxy.start()
    n = 60000
    descs = []
    for i in range(n):
        if i % 16 == 15:
            descs.append((PROXY_SIGNAL_ADD, 0, 0, 1, 0))
        else:
            off = 64 + (i % 1000) * 16384
            descs.append((PROXY_PUT, 0, off, off, 16384))
    result = {}

    def produce():
        result["r"] = ring.post_many(descs, timeout=30)

    th = threading.Thread(target=produce)
    th.start()
    try:
        deadline = time.monotonic() + 20
        while proxy.stats()["consumed"] < 2000:
            assert time.monotonic() < deadline, proxy.stats()
            time.sleep(0.01)
        busy = proxy.stats()
        assert busy["consumed"] < n, "the proxy finished before stop(): test did not test anything"
        t0 = time.monotonic()
        proxy.stop(drain_timeout=1.0)
        stop_s = time.monotonic() - t0
        th.join(10)
        assert not th.is_alive(), "the producer hung on a stopped proxy"
    finally:
        proxy.stop()
        th.join(10)
    assert stop_s < 3.0, stop_s
    posted, why, _ = result["r"]
    assert why == "closed", result
    assert posted < n, result
    assert not proxy.running
    assert ring.closed
    with pytest.raises(TransferError, match="closed"):
        ring.post(PROXY_SIGNAL, 0, 0, 1, 0)
    st = proxy.stats()
    assert sum(st["completed"]) + sum(st["dropped"]) == st["consumed"] <= posted
    assert ring.retired == ring.tail == st["consumed"]
    with pytest.raises(TransferError, match="cannot restart"):
        proxy.start()


# ---- throughput (native producer, shared memory) ------------------------------------------------


@pytest.mark.timeout(120)
def test_native_producer_throughput(engine_factory, proxy_peers, capsys):
    peer = proxy_peers("pxtp", alloc=4 * MiB)
    eng = engine_factory("pxtps")
    rseg = eng.open_segment(peer.desc("alloc"))
    local = eng.allocate(4 * MiB)
    ring = ProxyRing(4096, 1)
    n = 100000
    rates = {}
    with HostProxy(eng, ring, local, [rseg]) as proxy:
        for name, make in (
            ("signal_add", lambda i: (PROXY_SIGNAL_ADD, 0, 0, 1, 0)),
            (
                "put64+signal",
                lambda i: (
                    (PROXY_PUT, 0, 64 + 64 * (i % 1024), 0, 64)
                    if i % 2 == 0
                    else (PROXY_SIGNAL_ADD, 0, 8, 1, 0)
                ),
            ),
        ):
            descs = [make(i) for i in range(n)]
            t0 = time.perf_counter()
            posted, why, _ = ring.post_many(descs, timeout=10)
            assert (posted, why) == (n, "posted")
            assert ring.quiet(ring.head - 1, 60)
            rates[name] = n / (time.perf_counter() - t0)
        st = proxy.stats()
    assert st["dropped"] == [0]
    assert st["completed"] == [2 * n]
    assert peer.request(op="wait_word", seg="alloc", offset=0, minimum=n, timeout=5)["value"] == n
    with capsys.disabled():
        print(
            "\nproxy throughput (descriptors/s): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items())
        )
    assert min(rates.values()) > 20000, rates


# ---- (f) membership epochs and puts left in flight by stop() ------------------------------------


def _wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of `pid` is in state T (a SIGSTOP reaches the threads asynchronously)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "T":
                return False
    return True


def _u64(addr: int) -> int:
    return struct.unpack("<Q", (ctypes.c_char * 8).from_address(addr).raw)[0]


@pytest.mark.timeout(60)
def test_signal_of_another_epoch_is_rejected(engine_factory):
    """The applier applies only signals stamped with its epoch: one from a proxy of an older epoch
    (and a version-1 message without an epoch) is rejected and leaves the word alone."""
    a = engine_factory("pxep-a")
    b = engine_factory("pxep-b")
    remote = b.allocate(1 << 16)
    rseg = a.open_segment(remote.descriptor(), transport="tcp")
    local = a.allocate(4096)
    with ProxySignalApplier(b, [remote], epoch=5) as applier:
        assert applier.epoch == 5
        ring = ProxyRing(16, 1)
        with HostProxy(a, ring, local, [rseg], epoch=4) as old:
            ring.post(PROXY_SIGNAL_ADD, 0, 64, 7, 0)
            ring.post(PROXY_SIGNAL, 0, 72, 9, 0)
            assert ring.quiet(ring.head - 1, 10)
            assert old.stats()["signals_notify"] == 2  # sent: the receiver must reject them
        _wait_until(lambda: applier.rejected == 2, 10, "stale signals were not rejected")
        # A version-1 message ("SIGN" magic, 32-bit op, no epoch) is not applied either.
        v1 = struct.pack("<IIQQQ", 0x4E474953, PROXY_SIGNAL_ADD, remote.id, 64, 1)
        a.notify(b.name, v1, tag=PROXY_SIGNAL_TAG)
        _wait_until(lambda: applier.rejected == 3, 10, "a version-1 signal was not rejected")
        assert (applier.applied, applier.stale_epoch) == (0, 2)
        assert (_u64(remote.addr + 64), _u64(remote.addr + 72)) == (0, 0)
        ring2 = ProxyRing(16, 1)
        with HostProxy(a, ring2, local, [rseg], epoch=5):
            ring2.post(PROXY_SIGNAL_ADD, 0, 64, 3, 0)
            assert wait_word(remote.addr + 64, 3, 10.0) == 3
        assert (applier.applied, applier.rejected) == (1, 3)
    with pytest.raises(ValueError, match="epoch must be in"):
        HostProxy(a, ProxyRing(16, 1), local, [rseg], epoch=1 << 16)
    with pytest.raises(ValueError, match="epoch must be in"):
        ProxySignalApplier(b, [remote], epoch=-1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_restart_with_new_epoch_never_applies_an_old_signal(engine_factory, transport):
    """update_ep_member's order on a receiver: epoch 1 traffic, the sender's proxy stops, the
    applier stops, the buffer is zeroed, the applier restarts with epoch 2, a new proxy (epoch
    2) starts. Old signals that arrive after the zeroing (queued while the applier was stopped,
    and one sent late by a proxy still on epoch 1, the stand-in for a delayed notification) are
    rejected: the counter ends at exactly the new epoch's sum."""
    a = engine_factory(f"pxre-a-{transport}")
    b = engine_factory(f"pxre-b-{transport}")
    remote = b.allocate(1 << 20) if transport == "tcp" else None
    if remote is None:  # cma reaches registered memory
        import mmap

        mm = mmap.mmap(-1, 1 << 20)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        remote = b.register(base, 1 << 20)
    rseg = a.open_segment(remote.descriptor(), transport=transport)
    assert rseg.transport == transport
    local = a.allocate(1 << 20)
    local.view()[4096:8192] = bytes(range(256)) * 16
    applier = ProxySignalApplier(b, [remote], epoch=1)
    applier.start()
    try:
        # Epoch 1: put + signal pairs, the producer thread still posting when stop() comes.
        ring1 = ProxyRing(64, 1)
        p1 = HostProxy(a, ring1, local, [rseg], epoch=1)
        p1.start()
        descs = []
        for i in range(4000):
            descs.append((PROXY_PUT, 0, 4096 + 64 * (i % 64), 4096, 64))
            descs.append((PROXY_SIGNAL_ADD, 0, 0, 1, 0))
        result = {}
        th = threading.Thread(target=lambda: result.setdefault("r", ring1.post_many(descs, 30)))
        th.start()
        _wait_until(lambda: p1.stats()["signals_notify"] >= 50, 20, "epoch 1 sent no signals")
        # A late sender of epoch 1 (its proxy outlives the update, like a notification delayed
        # in the network) that will post after the restart.
        ring_late = ProxyRing(16, 1)
        late = HostProxy(a, ring_late, local, [rseg], epoch=1)
        late.start()
        applier.stop()  # the update begins: signals queue up from now on
        applied1 = applier.applied
        ring_late.post(PROXY_SIGNAL_ADD, 0, 0, 1000, 0)
        assert ring_late.quiet(ring_late.head - 1, 10)
        p1.stop(0.5)
        th.join(30)
        assert not th.is_alive()
        assert p1.wait_settled(10) == 0
        sent1 = p1.stats()["signals_notify"] + 1
        # The receiver's update: zero the buffer, new epoch, applier back (the queue not drained:
        # the epoch check alone must reject what is queued).
        ctypes.memset(remote.addr, 0, 64)
        applier.epoch = 2
        applier.start()
        ring2 = ProxyRing(64, 1)
        with HostProxy(a, ring2, local, [rseg], epoch=2) as p2:
            ring_late.post(PROXY_SIGNAL_ADD, 0, 0, 1000, 0)  # after the restart, epoch 1
            assert ring_late.quiet(ring_late.head - 1, 10)
            new = [(PROXY_PUT, 0, 8192, 4096, 64), (PROXY_SIGNAL_ADD, 0, 0, 3, 0)] * 20
            assert ring2.post_many(new, timeout=10)[:2] == (len(new), "posted")
            assert ring2.quiet(ring2.head - 1, 10)
            assert p2.stats()["signals_notify"] == 20
            total = sent1 + 1 + 20  # every signal sent, each applied or rejected once
            _wait_until(
                lambda: applier.applied + applier.stale_epoch >= total,
                20,
                f"signals missing: applied {applier.applied}, stale {applier.stale_epoch}",
            )
        late.stop()
        assert applier.applied == applied1 + 20, (applied1, applier.applied, applier.stale_epoch)
        assert applier.stale_epoch == sent1 + 1 - applied1
        assert applier.rejected == applier.stale_epoch
        assert _u64(remote.addr) == 60, "an epoch-1 signal landed after the restart"
    finally:
        applier.stop()


@pytest.mark.timeout(90)
def test_stop_keeps_unsettled_puts_until_they_settle(engine_factory, proxy_peers):
    """stop() with puts in flight to a stalled (SIGSTOPped) peer: they count as dropped and as
    unsettled; wait_settled() waits for them with a deadline, and once the peer runs again they
    land (a PUT_VALUE's source stays valid after stop()) and nothing is unsettled any more."""
    peer = proxy_peers("pxsettle", alloc=4 * MiB)
    eng = engine_factory("pxsettles")
    rseg = eng.open_segment(peer.desc("alloc"), transport="tcp")
    local = eng.allocate(4 * MiB)
    ring = ProxyRing(64, 1)
    proxy = HostProxy(eng, ring, local, [rseg])
    proxy.start()
    with pytest.raises(TransferError, match="stopped proxy"):
        proxy.wait_settled(0)
    os.kill(peer.pid, signal.SIGSTOP)
    try:
        _wait_until(lambda: _all_threads_stopped(peer.pid), 5, "the peer did not stop")
        descs = [(PROXY_PUT, 0, 4096 * (i + 1), 0, 4096) for i in range(8)]
        descs.append((PROXY_PUT_VALUE, 0, 64, 0x0EEDFACE12345678, 0))
        assert ring.post_many(descs, timeout=5)[:2] == (9, "posted")
        _wait_until(lambda: proxy.stats()["consumed"] == 9, 5, "the proxy did not take them")
        t0 = time.monotonic()
        proxy.stop(0.2)
        assert time.monotonic() - t0 < 2.0
        st = proxy.stats()
        assert st["unsettled"] == 9, st
        assert (st["dropped"], st["completed"]) == ([9], [0]), st
        assert "may still land" in st["last_drop"]
        assert ring.retired == ring.tail == 9
        t0 = time.monotonic()
        assert proxy.wait_settled(0.2) == 9  # the peer is still stopped: a bounded wait
        assert 0.15 < time.monotonic() - t0 < 2.0
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    assert proxy.wait_settled(20) == 0
    assert proxy.stats()["unsettled"] == 0
    reply = peer.request(op="wait_word", seg="alloc", offset=64, minimum=1, timeout=10)
    assert reply["value"] == 0x0EEDFACE12345678, reply
    # Counted once: the late completions do not change the books.
    st = proxy.stats()
    assert (st["dropped"], st["completed"]) == ([9], [0]), st
