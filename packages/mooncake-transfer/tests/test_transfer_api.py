"""API unit tests: notify ordering, matching, timeouts, handles, descriptors, bad arguments."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from transfer_testlib import LocalBuf

import mooncake.transfer as mt
from mooncake.transfer import (
    PeerDeadError,
    PeerState,
    RoundStatus,
    TransferEngine,
    TransferError,
    TransferStatus,
)

MiB = 1024 * 1024


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("transport", "which"), [("tcp", "alloc"), ("cma", "reg"), ("shm", "alloc")]
)
def test_notify_is_ordered_after_writes(engine_factory, peer_factory, transport, which):
    """The receiver hashes the region the moment the notification arrives: it must see every
    write issued before the notify, for async (submit) and sync writes, big and small."""
    chunk, nchunks = 2 * MiB, 8
    peer = peer_factory(f"orderee-{transport}", **{which: chunk * nchunks})
    eng = engine_factory(f"orderer-{transport}", transport=transport)
    rseg = eng.open_segment(peer.desc(which))
    assert rseg.transport == transport
    bufs = [LocalBuf(chunk) for _ in range(nchunks)]
    for rnd in range(4):
        blobs = [os.urandom(chunk) for _ in range(nchunks)]
        for b, data in zip(bufs, blobs):
            b.fill(data)
        peer.send_only(
            op="recv_sha", peer=eng.name, tag=rnd, seg=which, offset=0, length=chunk * nchunks
        )
        handles = [
            eng.submit([("write", rseg, i * chunk, bufs[i].addr, chunk)])
            for i in range(nchunks - 1)
        ]
        eng.write(rseg, (nchunks - 1) * chunk, bufs[-1].addr, chunk)
        eng.notify(peer.name, b"done-%d" % rnd, tag=rnd)  # no wait on the handles before notify
        reply = peer.read_reply()
        assert reply["ok"], reply
        assert reply["sha"] == hashlib.sha256(b"".join(blobs)).hexdigest(), (
            f"round {rnd}: notify overtook a write"
        )
        assert bytes.fromhex(reply["data"]) == b"done-%d" % rnd
        assert all(h.wait(10) == TransferStatus.DONE for h in handles)


@pytest.mark.timeout(60)
def test_recv_notify_matching_fifo_and_timeouts(engine_factory):
    a, b, c = engine_factory("a"), engine_factory("b"), engine_factory("c")
    a.connect(b.endpoint)
    c.connect(b.endpoint)
    a.notify("b", b"a1", tag=1)
    a.notify("b", b"a2", tag=2)
    a.notify("b", bytearray(b"a3"), tag=1)
    c.notify("b", memoryview(b"c1"), tag=1)
    c.notify_ptr("b", ctypes.addressof(ctypes.create_string_buffer(b"c2", 2)), 2, tag=2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(b.peers()) < 2:
        time.sleep(0.01)
    time.sleep(0.1)  # let all five arrive
    # FIFO holds per (peer, tag); across connections arrival order decides.
    n = b.recv_notify("a", tag=2, timeout=1)
    assert (n.peer, n.tag, n.data) == ("a", 2, b"a2")
    n = b.recv_notify("a", 1, timeout=1)
    assert n.data == b"a1"
    n = b.recv_notify("a", 1, timeout=1)
    assert n.data == b"a3"
    n = b.recv_notify_any(["c", "a"], 2, timeout=1)
    assert (n.peer, n.data) == ("c", b"c2")
    n = b.recv_notify(timeout=1)
    assert (n.peer, n.tag, n.data) == ("c", 1, b"c1")
    # nothing left: timeouts return None, promptly
    for t in (0, 0.05):
        t0 = time.monotonic()
        assert b.recv_notify(timeout=t) is None
        assert b.recv_notify("a", 1, timeout=t) is None
        assert b.recv_notify_any(["a", "c"], 1, timeout=t) is None
        assert time.monotonic() - t0 < t * 3 + 0.05
    # copy_to, nbytes, len
    a.notify("b", b"payload!", tag=9)
    n = b.recv_notify("a", 9, timeout=2)
    dst = ctypes.create_string_buffer(16)
    assert n.copy_to(ctypes.addressof(dst), 16) == 8
    assert dst.raw[:8] == b"payload!"
    assert len(n) == 8
    assert n.nbytes == 8
    with pytest.raises(ValueError, match="length"):
        n.copy_to(ctypes.addressof(dst), 4)
    # recv_notify_any is FIFO across peers by arrival
    for i in range(20):
        (a if i % 2 else c).notify("b", b"%d" % i, tag=5)
        time.sleep(0.005)
    time.sleep(0.1)
    got = [int(b.recv_notify_any(["a", "c"], 5, timeout=1).data) for _ in range(20)]
    assert got == list(range(20))


@pytest.mark.timeout(60)
def test_blocked_receiver_wakes_on_arrival_and_on_close(engine_factory):
    a, b = engine_factory("wa"), engine_factory("wb")
    a.connect(b.endpoint)
    out = []

    def recv():
        out.append(b.recv_notify("wa", 3, timeout=None))

    t = threading.Thread(target=recv)
    t.start()
    time.sleep(0.1)
    a.notify("wb", b"hi", tag=3)
    t.join(2)
    assert out
    assert out[0].data == b"hi"

    errs = []

    def recv_dead():
        try:
            b.recv_notify("wa", 4, timeout=None)
        except PeerDeadError as e:
            errs.append(e)

    t = threading.Thread(target=recv_dead)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    a.close()  # graceful close: peers see DEAD at once (BYE)
    t.join(2)
    assert errs
    assert errs[0].peer == "wa"
    assert time.monotonic() - t0 < 0.5
    assert b.peer_state("wa") == PeerState.DEAD


@pytest.mark.timeout(60)
def test_handles_descriptors_and_remote_rejection(engine_factory):
    owner, user = engine_factory("owner"), engine_factory("user", transport="tcp")
    seg = owner.allocate(1 * MiB)
    assert seg.addr % 4096 == 0
    assert seg.length == 1 * MiB
    assert seg.location == "cpu"
    desc = seg.descriptor()
    assert isinstance(desc, bytes)
    rseg = user.open_segment(desc)
    assert (rseg.peer, rseg.length, rseg.transport) == ("owner", 1 * MiB, "tcp")
    again = user.open_segment(desc)  # idempotent, same connection
    assert again.peer == "owner"
    assert owner._core.connection_count() == 1
    buf = LocalBuf(4096)
    buf.fill(b"\x5a" * 4096)
    h = user.submit([("write", rseg, 0, buf.addr, 4096), ("read", rseg, 0, buf.addr, 16)])
    assert h.wait(5) == TransferStatus.DONE
    assert h.poll() == TransferStatus.DONE
    assert h.error is None
    assert bytes(seg.view()[:4]) == b"\x5a" * 4
    # Segment.view writes are visible to remote reads
    seg.view()[100:104] = b"ABCD"
    user.read(rseg, 100, buf.addr, 4)
    assert buf.bytes(0, 4) == b"ABCD"
    # unregistered on the owner: the request fails (TransferError, not PeerDead), the peer stays
    view = seg.view()
    owner.unregister(seg)
    view[0:1] = b"z"  # the memoryview still owns a live mapping
    h = user.submit([("write", rseg, 0, buf.addr, 16)])
    assert h.wait(5) == TransferStatus.FAILED
    assert type(h.error) is TransferError
    assert "unknown segment" in str(h.error)
    with pytest.raises(TransferError, match="unknown segment"):
        user.read(rseg, 0, buf.addr, 16, timeout=5)
    assert user.peer_state("owner") == PeerState.ALIVE
    assert user.probe("owner") < 1.0
    with pytest.raises(ValueError, match="not registered"):
        owner.unregister(seg)
    # registered memory round trip through a descriptor
    mem = LocalBuf(8192)
    rs = owner.register(mem.addr, 8192)
    r2 = user.open_segment(rs.descriptor())
    buf.fill(b"\x5a" * 4096)
    user.write(r2, 8000, buf.addr, 192)
    assert mem.bytes(8000, 4) == b"\x5a" * 4
    # bad descriptors
    for bad in (b"", b"garbage", desc[:-3], desc + b"x"):
        with pytest.raises(ValueError, match="desc"):
            user.open_segment(bad)
    with pytest.raises(ValueError, match="desc"):
        owner.open_segment(rs.descriptor())  # own segment


@pytest.mark.timeout(60)
def test_bad_arguments_name_the_argument(engine_factory):
    a, b = engine_factory("x1"), engine_factory("x2")
    seg = b.allocate(4096)
    rseg = a.open_segment(seg.descriptor())
    buf = LocalBuf(4096)
    cases = [
        (lambda: a.write(rseg, -1, buf.addr, 1), "offset"),
        (lambda: a.write(rseg, 0, buf.addr, -1), "length"),
        (lambda: a.write(rseg, 4000, buf.addr, 100), "exceeds the remote segment length 4096"),
        (lambda: a.write(rseg, 0, 0, 10), "src_addr"),
        (lambda: a.read(rseg, 0, 0, 10), "dst_addr"),
        (lambda: a.write(rseg, 0, buf.addr, 1, timeout=-1), "timeout"),
        (lambda: a.write(rseg, 0, buf.addr, 1, timeout=float("nan")), "timeout"),
        (lambda: a.submit([("copy", rseg, 0, buf.addr, 1)]), r"ops\[0\]: kind"),
        (
            lambda: a.submit([("write", rseg, 0, buf.addr, 1), ("read", rseg, 0, buf.addr, 5000)]),
            r"ops\[1\]",
        ),
        (lambda: a.submit([("write", rseg, 0)]), r"ops\[0\]"),
        (lambda: a.notify("x2", b"x", tag=-1), "tag"),
        (lambda: a.recv_notify(timeout=-0.5), "timeout"),
        (lambda: a.recv_notify_any(["x2"], -3, 0), "tag"),
        (lambda: a.allocate(0), "length"),
        (lambda: a.register(0, 10), "addr"),
        (lambda: a.register(buf.addr, 10, "gpu"), "location"),
        (lambda: a.connect("nohostport"), "endpoint"),
        (lambda: a.connect("127.0.0.1:99999"), "endpoint"),
        (lambda: a.notify_ptr("x2", 0, 10), "addr"),
        (lambda: TransferEngine(port=70000), "port"),
        (lambda: TransferEngine(transport="udp"), "transport"),
        (
            lambda: TransferEngine(heartbeat_interval=0.5, heartbeat_timeout=0.6),
            "heartbeat_timeout",
        ),
        (lambda: TransferEngine(heartbeat_interval=0), "heartbeat_interval"),
        (lambda: TransferEngine(name=""), "name"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()
    with pytest.raises(TypeError, match="data"):
        a.notify("x2", "text")
    with pytest.raises(TypeError, match="seg"):
        a.unregister("not a segment")
    with pytest.raises(NotImplementedError, match="cuda"):
        a.register(buf.addr, 10, "cuda:0")
    with pytest.raises(ValueError, match="data"):
        a.notify("x2", bytes(64 * MiB + 1))
    with pytest.raises(TransferError, match="unknown peer"):
        a.notify("nobody", b"x")
    with pytest.raises(TransferError, match="unknown peer"):
        a.probe("nobody")


@pytest.mark.timeout(60)
def test_secret_env_and_config(engine_factory, monkeypatch):
    s1 = engine_factory("s1", secret="right")
    s2 = engine_factory("s2", secret=b"wrong")
    with pytest.raises(TransferError, match="bad secret"):
        s2.connect(s1.endpoint)
    assert s1.peer_state("s2") == PeerState.UNKNOWN
    monkeypatch.setenv("MOONCAKE_SECRET", "right")
    monkeypatch.setenv("MOONCAKE_TRANSPORT", "tcp")
    monkeypatch.setenv("MOONCAKE_HEARTBEAT_INTERVAL_MS", "20")
    monkeypatch.setenv("MOONCAKE_HEARTBEAT_TIMEOUT_MS", "300")
    s3 = engine_factory("s3")
    assert (s3.transport, s3.heartbeat_interval, s3.heartbeat_timeout) == ("tcp", 0.02, 0.3)
    assert s3.connect(s1.endpoint) == "s1"
    s4 = engine_factory("s4", transport="shm", heartbeat_interval=0.1, heartbeat_timeout=1.0)
    assert (s4.transport, s4.heartbeat_interval) == ("shm", 0.1)
    monkeypatch.setenv("MOONCAKE_HEARTBEAT_TIMEOUT_MS", "soon")
    with pytest.raises(ValueError, match="MOONCAKE_HEARTBEAT_TIMEOUT_MS"):
        TransferEngine()
    monkeypatch.delenv("MOONCAKE_HEARTBEAT_TIMEOUT_MS")
    auto = engine_factory()
    # The one heartbeat default, defined in the native core (the backend reads it from here).
    assert auto.heartbeat_timeout == mt.DEFAULT_HEARTBEAT_TIMEOUT == 3.0
    assert mt.DEFAULT_HEARTBEAT_INTERVAL == 0.1
    assert auto.name.count("-") >= 2
    assert auto.name != engine_factory().name
    assert ":" in auto.endpoint


@pytest.mark.timeout(90)
def test_crossing_connects_keep_one_connection(engine_factory):
    for rnd in range(10):
        x, y = engine_factory(f"p{rnd}-x"), engine_factory(f"p{rnd}-y")
        res = {}
        barrier = threading.Barrier(2)

        def dial(src, dst, key, barrier=barrier, res=res):
            barrier.wait()
            res[key] = src.connect(dst.endpoint)

        ts = [
            threading.Thread(target=dial, args=(x, y, "x")),
            threading.Thread(target=dial, args=(y, x, "y")),
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert res == {"x": y.name, "y": x.name}
        assert x._core.connection_count() == 1
        assert y._core.connection_count() == 1
        assert x.connect(y.endpoint) == y.name  # idempotent
        x.notify(y.name, b"ok")
        assert y.recv_notify(x.name, timeout=2).data == b"ok"
        x.close()
        y.close()


@pytest.mark.timeout(60)
def test_callbacks_poll_api_probe_and_close(engine_factory, caplog):
    a, b = engine_factory("cb-a"), engine_factory("cb-b")
    seen = []
    b.on_peer_state(lambda n, s: seen.append((n, s)))

    def bad_callback(n, s):
        raise RuntimeError("boom")

    b.on_peer_state(bad_callback)
    with pytest.raises(TypeError, match="callback"):
        b.on_peer_state(42)
    with caplog.at_level(logging.ERROR, logger="mooncake.transfer"):
        a.connect(b.endpoint)
        assert b.wait_peer_event(2) == ("cb-a", PeerState.ALIVE)
        rtt = a.probe("cb-b")
        assert 0 < rtt < 0.5
        a.close()
        a.close()  # idempotent
        assert b.wait_peer_event(2) == ("cb-a", PeerState.DEAD)
        assert b.wait_peer_event(0.05) is None
        deadline = time.monotonic() + 2
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == [("cb-a", PeerState.ALIVE), ("cb-a", PeerState.DEAD)]
    assert any("boom" in r.getMessage() or "boom" in str(r.exc_info) for r in caplog.records)
    with pytest.raises(TransferError, match="closed"):
        a.allocate(10)
    with TransferEngine("ctx") as e:
        assert not e.closed
    assert e.closed


@pytest.mark.timeout(60)
def test_del_without_close_does_not_hang_and_no_torch():
    code = (
        "import sys, mooncake.transfer as mt\n"
        "a = mt.TransferEngine('d1'); b = mt.TransferEngine('d2'); a.connect(b.endpoint)\n"
        "s = b.allocate(1 << 20); r = a.open_segment(s.descriptor())\n"
        "h = a.submit([('write', r, 0, s.addr, 1 << 20)])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('OK', flush=True)\n"
        "del a\n"  # dropped with a live connection; interpreter exit with b still open
    )
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout, p.stderr
    assert time.monotonic() - t0 < 10


def test_get_include_and_rdma_status():
    inc = mt.get_include()
    assert os.path.isfile(os.path.join(inc, "mooncake", "transfer", "version.h"))
    status = mt.rdma_status()
    assert isinstance(status, str)
    assert status
    if "no RDMA device" in status:  # every machine here; a real device would list its name
        with pytest.raises(TransferError, match="rdma"):
            TransferEngine(transport="rdma")


@pytest.mark.timeout(60)
def test_idle_cpu_is_tiny(peer_factory):
    peers = [peer_factory(f"idle-{i}") for i in range(3)]
    code = (
        "import sys, time, resource, mooncake.transfer as mt\n"
        "e = mt.TransferEngine('idle-main')\n"
        "for ep in sys.argv[1:]: e.connect(ep)\n"
        "time.sleep(0.5)\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.monotonic()\n"
        "time.sleep(3.0)\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF); t1 = time.monotonic()\n"
        "cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)\n"
        "print(cpu / (t1 - t0))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code] + [x.endpoint for x in peers],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    frac = float(p.stdout.strip())
    print(f"idle engine with 3 peers: {frac * 100:.2f}% of a core")
    assert frac < 0.02


@pytest.mark.timeout(60)
def test_notify_many_and_recv_round(engine_factory, peer_factory):
    a, b, c = engine_factory("ra"), engine_factory("rb"), engine_factory("rc")
    b.connect(a.endpoint)
    c.connect(a.endpoint)
    a.connect(b.endpoint)
    a.connect(c.endpoint)
    payload = ctypes.create_string_buffer(b"0123456789", 10)
    # One message = header bytes + raw payload, sent to both peers; nothing failed.
    assert a.notify_many(["rb", "rc"], b"HDR:", 7, ctypes.addressof(payload), 10) == []
    for e in (b, c):
        n = e.recv_notify("ra", 7, timeout=5)
        assert n.data == b"HDR:0123456789"
        assert n.head(4) == b"HDR:"
        assert n.head(100) == n.data
        dst = ctypes.create_string_buffer(16)
        assert n.copy_to(ctypes.addressof(dst), 16, offset=4) == 10
        assert dst.raw[:10] == b"0123456789"
        with pytest.raises(ValueError, match="offset"):
            n.copy_to(ctypes.addressof(dst), 16, offset=15)
        with pytest.raises(ValueError, match="length"):
            n.copy_to(ctypes.addressof(dst), 5, offset=4)
    # recv_round: big-endian keys; stale ones (< key) are dropped, the next one is the result
    # even when it is ahead of the key, and a peer with nothing queued times out.
    key = (5).to_bytes(8, "big")
    b.notify("ra", (3).to_bytes(8, "big") + b"old", 1)
    b.notify("ra", (5).to_bytes(8, "big") + b"cur", 1)
    b.notify("ra", (6).to_bytes(8, "big") + b"next", 1)
    c.notify("ra", (9).to_bytes(8, "big") + b"ahead", 1)
    time.sleep(0.1)
    res = a.recv_round(["rb", "rc"], 1, 2.0, 0, key)
    assert [(s, n.data[8:]) for s, n in res] == [(0, b"cur"), (0, b"ahead")]
    assert a.recv_notify("rb", 1, timeout=1).data[8:] == b"next"  # left queued
    t0 = time.monotonic()
    res = a.recv_round(["rb", "rc"], 1, 0.2, 0, key)
    assert res == [(2, None), (2, None)]
    assert res[0][0] is RoundStatus.TIMEOUT
    assert 0.15 <= time.monotonic() - t0 < 1.0
    # A waiting round resolves as soon as the last peer's message lands.
    threading.Timer(0.2, lambda: c.notify("ra", key + b"late", 2)).start()
    b.notify("ra", key + b"early", 2)
    t0 = time.monotonic()
    res = a.recv_round(["rb", "rc"], 2, 10.0, 0, key)
    assert [n.data[8:] for _, n in res] == [b"early", b"late"]
    assert time.monotonic() - t0 < 2.0
    # A killed peer: its queued message is still delivered, then it reads as dead (status 1).
    peer = peer_factory("rdead")
    assert a.connect(peer.endpoint) == peer.name
    os.kill(peer.pid, signal.SIGKILL)
    t0 = time.monotonic()
    res = a.recv_round([peer.name], 3, 10.0, 0, b"")
    assert res[0][0] is RoundStatus.DEAD
    assert isinstance(res[0][1], str)
    assert time.monotonic() - t0 < 2.0
    # The receiver's polling budget is per engine and checked.
    assert a.spin_us >= 0
    a.spin_us = 0
    assert a.spin_us == 0
    with pytest.raises(ValueError, match="spin_us"):
        a.spin_us = -1
    failed = a.notify_many(["rb", peer.name], b"x", 4)
    assert [p for p, _ in failed] == [peer.name]
    assert b.recv_notify("ra", 4, timeout=5).data == b"x"


@pytest.mark.timeout(60)
def test_exchange_round(engine_factory, peer_factory):
    a, b, c = engine_factory("xa"), engine_factory("xb"), engine_factory("xc")
    for x, y in ((a, b), (a, c), (b, a), (c, a)):
        x.connect(y.endpoint)
    key = (5).to_bytes(8, "big")
    head = key + b"H"
    # Peers' messages for this round: b's matches, c's has another head (returned as is), and a
    # stale message from b (key 3) is dropped first.
    b.notify("xa", (3).to_bytes(8, "big") + b"Hold!", 1)
    b.notify("xa", head + b"bbbb", 1)
    c.notify("xa", key + b"Xcccc", 1)
    payload = ctypes.create_string_buffer(b"mine", 4)
    dst = [ctypes.create_string_buffer(4) for _ in range(2)]
    dests = [ctypes.addressof(d) for d in dst]
    rounds, res = a.exchange_round(
        ["xb", "xc"], 1, head, 5.0, addr=ctypes.addressof(payload), length=4, key=key,
        expect=head, dests=dests, dest_len=4, then=b"DONE", second=key + b"V",
    )  # fmt: skip
    assert rounds == 1  # not every payload landed: no second round, no `then`
    assert res[0] == (3, None)
    # Statuses are RoundStatus members (an IntEnum: the integers compare equal too).
    assert [s for s, _ in res] == [RoundStatus.LANDED, RoundStatus.MESSAGE]
    assert type(res[0][0]) is RoundStatus
    assert res[0][0].name == "LANDED"
    assert dst[0].raw == b"bbbb"
    assert res[1][0] == 0
    assert res[1][1].data == key + b"Xcccc"
    assert dst[1].raw == b"\0" * 4  # not landed: untouched
    for e in (b, c):  # the data went out, joined; nothing else did
        assert e.recv_notify("xa", 1, timeout=5).data == head + b"mine"
        assert e.recv_notify("xa", 1, timeout=0.2) is None
    # Every payload lands, then the second round's messages too: `then` goes to every peer.
    for e, tag in ((b, b"b2"), (c, b"c2")):
        e.notify("xa", head + tag, 2)
        e.notify("xa", key + b"V", 2)
    rounds, res = a.exchange_round(
        ["xb", "xc"], 2, head, 5.0, addr=ctypes.addressof(payload), length=2, key=key,
        expect=head, dests=dests, dest_len=2, then=b"DONE", second=key + b"V",
    )  # fmt: skip
    assert (rounds, res) == (2, [(3, None), (3, None)])
    assert [d.raw[:2] for d in dst] == [b"b2", b"c2"]
    for e in (b, c):
        assert [e.recv_notify("xa", 2, timeout=5).data for _ in range(3)] == [
            head + b"mi",
            key + b"V",
            b"DONE",
        ]
    # The second round's other messages come back; a silent peer times out there after at least
    # second_min_timeout, although the call's own timeout is shorter.
    b.notify("xa", b"d", 3)
    c.notify("xa", b"d", 3)
    b.notify("xa", b"other", 3)
    t0 = time.monotonic()
    rounds, res = a.exchange_round(
        ["xb", "xc"], 3, b"d", 0.05, expect=b"d", second=b"v", second_min_timeout=0.3, then=b"X"
    )
    assert rounds == 2
    assert res[0][0] == 0
    assert res[0][1].data == b"other"
    assert res[1] == (2, None)
    assert 0.25 <= time.monotonic() - t0 < 2.0
    # One round only: `then` follows it when every message matched.
    b.notify("xa", b"vote", 4)
    c.notify("xa", b"vote", 4)
    assert a.exchange_round(["xb", "xc"], 4, b"vote", 5.0, expect=b"vote", then=b"DONE") == (
        1,
        [(3, None), (3, None)],
    )
    for e in (b, c):
        assert e.recv_notify("xa", 4, timeout=5).data == b"vote"
        assert e.recv_notify("xa", 4, timeout=5).data == b"DONE"
    # dests[i] = 0: peer i sends the header alone (a broadcast's non-root). c's header-only
    # message lands; the same from b (whose dest wants the payload) does not, nor does a
    # payload from c.
    b.notify("xa", head + b"bb", 7)
    c.notify("xa", head, 7)
    dst[0].raw = b"\0" * 4
    rounds, res = a.exchange_round(
        ["xb", "xc"], 7, head, 5.0, key=key, expect=head, dests=[dests[0], 0], dest_len=2,
    )  # fmt: skip
    assert (rounds, res) == (1, [(3, None), (3, None)])
    assert dst[0].raw[:2] == b"bb"
    b.notify("xa", head, 8)
    c.notify("xa", head + b"cc", 8)
    rounds, res = a.exchange_round(
        ["xb", "xc"], 8, head, 5.0, key=key, expect=head, dests=[dests[0], 0], dest_len=2,
    )  # fmt: skip
    assert [s for s, _ in res] == [RoundStatus.MESSAGE, RoundStatus.MESSAGE]
    for e in (b, c):
        for tag in (7, 8):
            assert e.recv_notify("xa", tag, timeout=5).data == head
    with pytest.raises(ValueError, match="header-only"):
        a.exchange_round(
            ["xb", "xc"], 9, head, 1.0, expect=head, dests=[dests[0], 0], dest_len=4,
            reduce=(1, 1, 1, dests[1], dests[1], 0),
        )  # fmt: skip
    # A killed peer: the send fails (4) or it reads as dead (1), within the timeout, never a hang.
    peer = peer_factory("xdead")
    assert a.connect(peer.endpoint) == peer.name
    os.kill(peer.pid, signal.SIGKILL)
    t0 = time.monotonic()
    rounds, res = a.exchange_round([peer.name], 5, b"v", 10.0, expect=b"v")
    assert rounds == 1
    assert res[0][0] in (RoundStatus.DEAD, RoundStatus.SEND_FAILED)
    assert isinstance(res[0][1], str)
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(ValueError, match="dests"):
        a.exchange_round(["xb", "xc"], 6, b"v", 1.0, dests=[1], dest_len=4)
    with pytest.raises(ValueError, match="addr"):
        a.exchange_round(["xb"], 6, b"v", 1.0, length=4)
    with pytest.raises(ValueError, match="second_min_timeout"):
        a.exchange_round(["xb"], 6, b"v", 1.0, second=b"v", second_min_timeout=-1)


@pytest.mark.timeout(60)
def test_exchange_round_reduce(engine_factory):
    """The optional fold over the landed rows: member order (this rank at self_pos), float32
    rounding at every step, wrapping integers, and nothing written unless every row landed."""
    import struct

    a, b, c = engine_factory("ya"), engine_factory("yb"), engine_factory("yc")
    for x, y in ((a, b), (a, c), (b, a), (c, a)):
        x.connect(y.endpoint)
    head = b"H" * 8

    def f32(*v):
        return struct.pack(f"<{len(v)}f", *v)

    def run(tag, mine: bytes, theirs: dict, reduce_spec, out_len, fmt):
        for e, name in ((b, "yb"), (c, "yc")):
            if name in theirs:
                e.notify("ya", head + theirs[name], tag)
        src = ctypes.create_string_buffer(mine, len(mine))
        rows = [ctypes.create_string_buffer(len(mine)) for _ in range(2)]
        out = ctypes.create_string_buffer(out_len)
        dtype, op, count, pos = reduce_spec
        _, res = a.exchange_round(
            ["yb", "yc"], tag, head, 0.5, expect=head, dests=[ctypes.addressof(r) for r in rows],
            dest_len=len(mine),
            reduce=(dtype, op, count, ctypes.addressof(src), ctypes.addressof(out), pos),
        )  # fmt: skip
        for e in (b, c):
            e.recv_notify("ya", tag, timeout=5)
        return res, struct.unpack(fmt, out.raw)

    # float32 sum in member order b, a, c: (1 + 1e8) rounds to 1e8, then - 1e8 = 0 (any other
    # order gives 1); the second element checks plain addition.
    theirs = {"yb": f32(1.0, 1.0), "yc": f32(-1e8, 4.0)}
    res, got = run(1, f32(1e8, 2.5), theirs, (1, 1, 2, 1), 8, "<2f")
    assert res == [(3, None), (3, None)]
    assert got == (0.0, 7.5)
    # This rank first: (1e8 + -1e8) + 1 = 1.
    _, got = run(2, f32(1e8), {"yb": f32(-1e8), "yc": f32(1.0)}, (1, 1, 1, 0), 4, "<f")
    assert got == (1.0,)
    # int64 sum wraps; int32 min / max; float64 product.
    big = (1 << 63) - 1
    one = struct.pack("<q", 1)
    _, got = run(3, struct.pack("<q", big), {"yb": one, "yc": one}, (4, 1, 1, 2), 8, "<q")
    assert got == (-(1 << 63) + 1,)
    i32 = lambda *v: struct.pack(f"<{len(v)}i", *v)  # noqa: E731
    _, got = run(4, i32(5, -7), {"yb": i32(3, 9), "yc": i32(8, -8)}, (3, 3, 2, 0), 8, "<2i")
    assert got == (3, -8)
    _, got = run(5, i32(5, -7), {"yb": i32(3, 9), "yc": i32(8, -8)}, (3, 4, 2, 0), 8, "<2i")
    assert got == (8, 9)
    f64 = lambda v: struct.pack("<d", v)  # noqa: E731
    _, got = run(6, f64(1.5), {"yb": f64(-2.0), "yc": f64(4.0)}, (2, 2, 1, 1), 8, "<d")
    assert got == (-12.0,)
    # A row that did not land (c silent): nothing is written.
    res, got = run(7, f32(1.0), {"yb": f32(2.0)}, (1, 1, 1, 0), 4, "<f")
    assert res[1] == (2, None)
    assert got == (0.0,)
    # Bad specs are named.
    x = ctypes.create_string_buffer(8)
    ax = ctypes.addressof(x)
    for spec, match in (
        ((9, 1, 1, ax, ax, 0), "dtype"),
        ((1, 3, 1, ax, ax, 0), "op"),
        ((1, 1, 3, ax, ax, 0), "dest_len"),
        ((1, 1, 1, ax, ax, 5), "self_pos"),
        ((1, 1, 1, 0, ax, 0), "address"),
        ((1, 1, 1), "reduce must be"),
    ):
        with pytest.raises(ValueError, match=match):
            a.exchange_round(["yb", "yc"], 8, head, 0.1, expect=head, dests=[ax, ax], dest_len=4,
                             reduce=spec)  # fmt: skip
