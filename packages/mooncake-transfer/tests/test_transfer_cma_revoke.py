"""unregister() stops CMA access (csrc/seg_guard.h): a same-host peer that reaches registered memory
with process_vm_writev/readv cannot touch it once unregister() has returned, its later attempts fail
like a TCP peer's ("unknown segment"), and a peer killed in mid-copy does not hold unregister up.

The owner is this process's engine, the peer a real process (tests/transfer_peer_proc.py) that
writes or reads in a loop (op "cma_loop"); times are time.monotonic(), one clock for the host."""

from __future__ import annotations

import os
import signal
import time

import pytest
from transfer_testlib import LocalBuf

from mooncake.transfer import TransferError

MiB = 1024 * 1024


def _wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def _stays(buf: LocalBuf, expect: bytes, seconds: float) -> int:
    """Checks for `seconds` that `buf` keeps holding `expect`; returns how many checks failed."""
    bad = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if buf.bytes() != expect:
            bad += 1
        time.sleep(0.0005)
    return bad


def _start_writer(owner, peer, tmp_path, size: int, byte: int, after_fail: float):
    """Registers a plain `size`-byte buffer and has `peer` write `byte` into it over cma in a loop
    (until the stop file appears; `after_fail` s more once a write failed); returns (buf, seg,
    stop file) once a first write landed."""
    buf = LocalBuf(size)
    seg = owner.register(buf.addr, size)
    stop = tmp_path / "stop"
    peer.send_only(
        op="cma_loop",
        desc=seg.descriptor().hex(),
        size=size,
        byte=byte,
        seconds=30.0,
        stop_file=str(stop),
        after_fail=after_fail,
    )
    _wait_until(lambda: buf.bytes(0, 1) == bytes([byte]), 20.0, "the peer's cma writes to land")
    return buf, seg, stop


def _watch_zeroed(buf: LocalBuf, stop, peer) -> tuple[float, int, dict]:
    """Right after access was revoked: zero-fills `buf` and watches it for 1 s, then stops the
    peer's loop. Returns (when the revoking call returned, failed checks, the peer's report)."""
    t_ret = time.monotonic()
    buf.fill(bytes(buf.size))
    bad = _stays(buf, bytes(buf.size), 1.0)
    stop.touch()
    res = peer.read_reply(timeout=30.0)
    assert res["ok"], res
    assert res["transport"] == "cma", res
    return t_ret, bad, res


def _assert_refused_like_tcp(res: dict, seg_id: int, verb: str) -> None:
    assert res["n_fail"] > 0, res
    for msg in res["errors"]:
        assert msg.startswith("TransferError: "), res["errors"]
        assert f"{verb} unknown segment {seg_id}" in msg, res["errors"]
    assert res["ok_after_fail"] == 0, res


@pytest.mark.timeout(90)
def test_cma_writes_stop_when_unregister_returns(engine_factory, peer_factory, tmp_path):
    """(a) A plain registered buffer, written in a loop by a peer over cma: once unregister()
    returned, no write lands (the owner zero-fills and watches the buffer for 1 s) and the peer's
    later writes fail with TransferError "WRITE to unknown segment N", as over tcp."""
    owner = engine_factory("cmarev-owner")
    peer = peer_factory("cmarev-writer")
    size = 64 * 1024
    buf, seg, stop = _start_writer(owner, peer, tmp_path, size, 0xA5, 1.5)
    time.sleep(0.05)
    owner.unregister(seg, timeout=10.0)
    t_ret, bad, res = _watch_zeroed(buf, stop, peer)
    assert bad == 0, f"writes landed after unregister() returned ({bad} checks); peer: {res}"
    assert res["n_ok"] > 0, res
    assert res["last_ok_start"] < t_ret, res
    assert res["first_fail"] < t_ret + 0.5, res  # failed from the moment the word was cleared
    _assert_refused_like_tcp(res, seg.id, "WRITE to")


@pytest.mark.timeout(90)
def test_cma_reads_stop_when_unregister_returns(engine_factory, peer_factory, tmp_path):
    """(b) Reads likewise: no successful read returns what the owner wrote after unregister()
    returned, and later reads fail with TransferError "READ of unknown segment N"."""
    owner = engine_factory("cmarev-owner-r")
    peer = peer_factory("cmarev-reader")
    size = 64 * 1024
    buf = LocalBuf(size)
    buf.fill(b"\x11" * size)
    seg = owner.register(buf.addr, size)
    stop = tmp_path / "stop"
    started = tmp_path / "started"
    peer.send_only(
        op="cma_loop",
        desc=seg.descriptor().hex(),
        size=size,
        mode="read",
        secret=0xEE,
        seconds=30.0,
        stop_file=str(stop),
        started_file=str(started),
        after_fail=1.5,
    )
    _wait_until(started.exists, 20.0, "the peer's first cma read")
    time.sleep(0.05)
    owner.unregister(seg, timeout=10.0)
    t_ret = time.monotonic()
    buf.fill(b"\xee" * size)
    time.sleep(1.0)
    stop.touch()
    res = peer.read_reply(timeout=30.0)
    assert res["ok"], res
    assert res["transport"] == "cma"
    assert res["n_ok"] > 0, res
    assert res["last_ok_start"] < t_ret, res
    assert not res["secret_seen"], f"a read after unregister() returned saw the new bytes: {res}"
    _assert_refused_like_tcp(res, seg.id, "READ of")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reap", [False, True], ids=["zombie", "reaped"])
def test_peer_killed_in_mid_copy_does_not_hold_unregister(engine_factory, peer_factory, reap):
    """(c) A peer killed (SIGKILL, native fault point 'cma') while its in-flight count on the
    segment is raised: unregister() returns at once (the owner proves the process gone through
    its pidfd, or its pid, and frees its lane), well before its timeout."""
    owner = engine_factory(f"cmarev-owner-k{int(reap)}")
    peer = peer_factory(f"cmarev-victim{int(reap)}")
    size = 4096
    buf = LocalBuf(size)
    seg = owner.register(buf.addr, size)
    assert peer.request(op="arm_fault", point="cma", nth=50)["ok"]
    peer.send_only(op="cma_loop", desc=seg.descriptor().hex(), size=size, seconds=30.0)
    # Wait for the exit without reaping it (a zombie until peer.proc.wait()).
    _wait_until(
        lambda: os.waitid(os.P_PID, peer.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None,
        20.0,
        "the peer to kill itself at the fault point",
    )
    assert peer.proc.returncode is None  # not reaped yet
    if reap:
        peer.proc.wait(timeout=10)
    assert buf.bytes(0, 1) == b"\xa5"  # 49 writes landed first
    before = owner._core._stats()["cma_dead_lanes"]
    t0 = time.monotonic()
    owner.unregister(seg, timeout=20.0)
    took = time.monotonic() - t0
    assert took < 2.0, f"unregister took {took:.2f}s"
    assert owner._core._stats()["cma_dead_lanes"] == before + 1


@pytest.mark.timeout(120)
def test_peer_killed_during_large_cma_writes(engine_factory, peer_factory):
    """(c) kill -9 at some point of a stream of 32 MiB cma writes (likely inside the syscall):
    unregister() returns promptly and the buffer stays as left."""
    owner = engine_factory("cmarev-owner-big")
    peer = peer_factory("cmarev-bigwriter")
    size = 32 * MiB
    buf = LocalBuf(size)
    seg = owner.register(buf.addr, size)
    peer.send_only(op="cma_loop", desc=seg.descriptor().hex(), size=size, seconds=30.0)
    _wait_until(lambda: buf.bytes(size - 1, 1) == b"\xa5", 20.0, "a first full write")
    time.sleep(0.2)
    os.kill(peer.pid, signal.SIGKILL)
    t0 = time.monotonic()
    owner.unregister(seg, timeout=20.0)
    took = time.monotonic() - t0
    assert took < 3.0, f"unregister took {took:.2f}s"
    buf.fill(bytes(16))
    assert _stays(buf, bytes(16) + b"\xa5" * (size - 16), 0.3) == 0
    peer.proc.wait(timeout=10)


@pytest.mark.timeout(90)
def test_reregistered_memory_works_with_a_fresh_descriptor(engine_factory, peer_factory):
    """(d) After unregister, the same memory registered again (a new generation, maybe the same
    guard slot) and a new buffer both work over cma with their new descriptors, while the old
    descriptor keeps failing."""
    owner = engine_factory("cmarev-owner-re")
    peer = peer_factory("cmarev-rereg")
    size = 8192
    buf = LocalBuf(size)
    seg = owner.register(buf.addr, size)
    old_desc = seg.descriptor().hex()
    r = peer.request(op="roundtrip", desc=old_desc, size=size, transport="cma")
    assert (r["ok"], r["exact"], r["transport"]) == (True, True, "cma"), r
    owner.unregister(seg)
    again = owner.register(buf.addr, size)  # same memory
    other = LocalBuf(size)
    fresh = owner.register(other.addr, size)  # new memory
    for s in (again, fresh):
        r = peer.request(op="roundtrip", desc=s.descriptor().hex(), size=size, transport="cma")
        assert (r["ok"], r["exact"], r["transport"]) == (True, True, "cma"), r
    res = peer.request(op="cma_loop", desc=old_desc, size=16, seconds=0.2, after_fail=0.2)
    assert res["ok"], res
    assert res["n_ok"] == 0, res
    _assert_refused_like_tcp(res, seg.id, "WRITE to")
    owner.unregister(again)
    owner.unregister(fresh)


@pytest.mark.timeout(90)
def test_cma_writes_stop_when_the_owner_engine_closes(engine_factory, peer_factory, tmp_path):
    """close() revokes CMA access to every segment like unregister(): no write lands after it
    returned (the process and its memory live on), and the peer's later writes fail with
    PeerDeadError (the owner closed)."""
    owner = engine_factory("cmarev-owner-close")
    peer = peer_factory("cmarev-closewriter")
    buf, _seg, stop = _start_writer(owner, peer, tmp_path, 16 * 1024, 0x5C, 1.0)
    owner.close()
    t_ret, bad, res = _watch_zeroed(buf, stop, peer)
    assert bad == 0, f"writes landed after close() returned; peer: {res}"
    assert res["last_ok_start"] < t_ret, res
    assert res["n_fail"] > 0, res
    assert res["ok_after_fail"] == 0, res
    assert all(m.startswith("PeerDeadError: ") for m in res["errors"]), res["errors"]


@pytest.mark.timeout(60)
def test_version_1_descriptor_is_reached_over_tcp(engine_factory):
    """A descriptor of an older owner (version 1: no guard fields) is never reached over cma,
    which that owner could not revoke, but over tcp; after unregister both the tcp and the cma
    segment fail with the same error."""
    owner = engine_factory("cmarev-v1-owner")
    user = engine_factory("cmarev-v1-user")
    buf = LocalBuf(4096)
    seg = owner.register(buf.addr, 4096)
    desc = seg.descriptor()
    assert desc[4] == 2  # the version byte, after the magic
    # The guard fields close the descriptor: u32 fd, u16-length name, u32 slot, u64 generation.
    tail = desc.index(b"mooncake-guard-") - 6
    assert len(desc) - tail == 4 + 2 + len("mooncake-guard-") + 16 + 4 + 8
    v1 = desc[:4] + b"\x01" + desc[5:tail]
    old = user.open_segment(v1, transport="cma")
    assert old.transport == "tcp"
    new = user.open_segment(desc, transport="cma")
    assert new.transport == "cma"
    src = LocalBuf(64)
    for i, rs in enumerate((old, new)):
        src.fill(bytes([0x40 + i]) * 64)
        user.write(rs, 0, src.addr, 64)
        assert buf.bytes(0, 64) == bytes([0x40 + i]) * 64
    owner.unregister(seg)
    for rs in (old, new):
        with pytest.raises(TransferError, match=f"WRITE to unknown segment {seg.id}"):
            user.write(rs, 0, src.addr, 64, timeout=5)
        with pytest.raises(TransferError, match=f"READ of unknown segment {seg.id}"):
            user.read(rs, 0, src.addr, 64, timeout=5)
