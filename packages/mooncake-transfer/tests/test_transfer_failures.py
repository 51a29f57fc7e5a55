"""Acceptance 4: kill -9 / SIGSTOP / SIGCONT of a peer process, with real signals and sockets."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from transfer_testlib import LocalBuf

from mooncake.transfer import PeerDeadError, PeerState, TransferError, TransferStatus

MiB = 1024 * 1024


def _stream_then_kill(engine_factory, peer_factory, transport, which, op_size, max_inflight):
    peer = peer_factory(f"victim-{transport}", **{which: 64 * MiB})
    eng = engine_factory(f"streamer-{transport}", transport=transport)
    rseg = eng.open_segment(peer.desc(which))
    assert rseg.transport == transport
    buf = LocalBuf(op_size)
    handles = []
    kill_at = [0.0]

    def killer():
        time.sleep(0.3)
        kill_at[0] = time.monotonic()
        os.kill(peer.pid, signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    deadline = time.monotonic() + 10
    slots = (64 * MiB) // op_size
    i = 0
    # Keep submitting until submissions fail: the stream spans the kill.
    while time.monotonic() < deadline:
        inflight = [h for h in handles[-max_inflight:] if h.poll() is None]
        if len(inflight) >= max_inflight:
            inflight[0].wait(0.01)
            continue
        h = eng.submit([("write", rseg, (i % slots) * op_size, buf.addr, op_size)])
        handles.append(h)
        i += 1
        if kill_at[0] and h.poll() == TransferStatus.FAILED:
            break
    t.join()
    assert kill_at[0], "kill did not happen"
    for h in handles:
        h.wait(5.0)
    t_all_done = time.monotonic()
    assert eng.peer_state(peer.name) == PeerState.DEAD
    failed = [h for h in handles if h.poll() == TransferStatus.FAILED]
    pending_at_kill = len(failed)
    assert pending_at_kill >= 1
    assert all(h.poll() in (TransferStatus.DONE, TransferStatus.FAILED) for h in handles)
    for h in failed:
        assert isinstance(h.error, PeerDeadError), h.error
        assert h.error.peer == peer.name
    # The latest failure happened no later than this, and all of them within 100 ms of the kill.
    elapsed = t_all_done - kill_at[0]
    assert elapsed <= 0.1, f"pending transfers took {elapsed * 1e3:.1f} ms to fail after kill -9"
    with pytest.raises(PeerDeadError):
        eng.write(rseg, 0, buf.addr, 16, timeout=1)
    return len(handles), pending_at_kill, elapsed


@pytest.mark.timeout(60)
def test_kill9_fails_pending_tcp_transfers_within_100ms(engine_factory, peer_factory):
    n, failed, elapsed = _stream_then_kill(
        engine_factory, peer_factory, "tcp", "alloc", 1 * MiB, 16
    )
    print(f"tcp: {n} transfers, {failed} failed, all done {elapsed * 1e3:.1f} ms after kill -9")


@pytest.mark.timeout(60)
def test_kill9_fails_pending_shm_transfers_within_100ms(engine_factory, peer_factory):
    # 1 MiB ops are above the inline-copy limit: they queue on the copy worker (async).
    n, failed, elapsed = _stream_then_kill(engine_factory, peer_factory, "shm", "alloc", 1 * MiB, 8)
    print(f"shm: {n} transfers, {failed} failed, all done {elapsed * 1e3:.1f} ms after kill -9")


@pytest.mark.timeout(60)
def test_kill9_wakes_blocked_recv_notify(engine_factory, peer_factory):
    peer = peer_factory("silent")
    eng = engine_factory("waiter")
    assert eng.connect(peer.endpoint) == peer.name
    result = {}

    def waiter():
        try:
            eng.recv_notify(peer.name, tag=1, timeout=None)
            result["err"] = None
        except PeerDeadError as e:
            result["err"] = e
        result["t"] = time.monotonic()

    def any_waiter():
        try:
            eng.recv_notify_any(["nobody", peer.name], tag=2, timeout=30)
            result["any"] = None
        except PeerDeadError as e:
            result["any"] = e

    th = [threading.Thread(target=waiter), threading.Thread(target=any_waiter)]
    for x in th:
        x.start()
    time.sleep(0.2)
    t_kill = time.monotonic()
    os.kill(peer.pid, signal.SIGKILL)
    for x in th:
        x.join(5)
    assert isinstance(result["err"], PeerDeadError)
    assert result["err"].peer == peer.name
    assert isinstance(result["any"], PeerDeadError)
    assert result["any"].peer == peer.name
    assert result["t"] - t_kill <= 0.1
    # And a new waiter on the dead peer raises at once.
    t0 = time.monotonic()
    with pytest.raises(PeerDeadError):
        eng.recv_notify(peer.name, timeout=None)
    assert time.monotonic() - t0 < 0.05
    with pytest.raises(PeerDeadError):
        eng.probe(peer.name)


def _events_until(eng, name, want, timeout):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = eng.wait_peer_event(max(0.0, deadline - time.monotonic()))
        if ev is None:
            break
        if ev[0] == name:
            seen.append((time.monotonic(), ev[1]))
            if ev[1] == want:
                break
    return seen


@pytest.mark.timeout(60)
def test_sigstop_dead_within_timeout_plus_20pct(engine_factory, peer_factory):
    hb_timeout = 0.5
    peer = peer_factory("stopped", hb_interval=0.05, hb_timeout=hb_timeout)
    eng = engine_factory("watcher", heartbeat_interval=0.05, heartbeat_timeout=hb_timeout)
    eng.connect(peer.endpoint)
    assert _events_until(eng, peer.name, PeerState.ALIVE, 2)[-1][1] == PeerState.ALIVE
    time.sleep(0.3)  # a few heartbeats
    t_stop = time.monotonic()
    os.kill(peer.pid, signal.SIGSTOP)
    try:
        seen = _events_until(eng, peer.name, PeerState.DEAD, 3 * hb_timeout)
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    states = [s for _, s in seen]
    assert states[-1] == PeerState.DEAD, states
    assert PeerState.SUSPECT in states
    dt = seen[-1][0] - t_stop
    # Silence starts at the last heartbeat, up to one interval before the stop.
    assert hb_timeout - 0.05 - 0.02 <= dt <= hb_timeout * 1.2, f"DEAD after {dt * 1e3:.0f} ms"
    assert eng.peer_state(peer.name) == PeerState.DEAD
    print(f"SIGSTOP -> DEAD after {dt * 1e3:.0f} ms (timeout {hb_timeout * 1e3:.0f} ms)")


@pytest.mark.timeout(60)
def test_sigcont_before_timeout_no_false_failure(engine_factory, peer_factory):
    hb_timeout = 0.5
    peer = peer_factory("paused", alloc=1 * MiB, hb_interval=0.05, hb_timeout=hb_timeout)
    eng = engine_factory("patient", heartbeat_interval=0.05, heartbeat_timeout=hb_timeout)
    rseg = eng.open_segment(peer.desc("alloc"), transport="tcp")
    buf = LocalBuf(4096)
    buf.fill(b"x" * 4096)
    states = []
    eng.on_peer_state(lambda n, s: states.append(s) if n == peer.name else None)
    for _ in range(3):
        os.kill(peer.pid, signal.SIGSTOP)
        # a write issued while the peer is stopped completes once it resumes
        h = eng.submit([("write", rseg, 0, buf.addr, 4096)])
        time.sleep(0.3)
        os.kill(peer.pid, signal.SIGCONT)
        assert h.wait(2.0) == TransferStatus.DONE, h.error
        time.sleep(0.3)
    time.sleep(hb_timeout)
    assert eng.peer_state(peer.name) == PeerState.ALIVE
    assert PeerState.DEAD not in states
    assert PeerState.SUSPECT in states  # it was noticed, but not declared dead
    r = peer.request(op="state", peer="patient")
    assert r["state"] == int(PeerState.ALIVE)
    assert eng.probe(peer.name) < 0.5


@pytest.mark.timeout(60)
def test_replacement_needs_new_name_dead_is_final(engine_factory, peer_factory):
    first = peer_factory("rank1-a")
    eng = engine_factory("survivor")
    eng.connect(first.endpoint)
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(5)
    _events_until(eng, first.name, PeerState.DEAD, 2)
    assert eng.peer_state(first.name) == PeerState.DEAD
    # A replacement process (new name) joins; the dead name stays dead until disconnect().
    second = peer_factory("rank1-b")
    assert second.request(op="connect", endpoint=eng.endpoint)["peer"] == "survivor"
    assert eng.peer_state("rank1-b") == PeerState.ALIVE
    assert eng.peer_state(first.name) == PeerState.DEAD
    eng.disconnect(first.name)
    assert first.name not in eng.peers()
    assert eng.peer_state(first.name) == PeerState.UNKNOWN
    with pytest.raises(TransferError):
        eng.notify(first.name, b"x")


_FORKING_VICTIM = r"""
import os, sys, time
from mooncake.transfer import TransferEngine
e = TransferEngine("victim-" + str(os.getpid()))
e.connect(sys.argv[1])
e.notify(sys.argv[2], b"hi", 1)
assert e.recv_notify(sys.argv[2], 1, timeout=30).data == b"ping"
child = os.fork()
if child == 0:  # the child keeps every socket of the engine open, then sleeps
    time.sleep(60)
    os._exit(0)
e.notify(sys.argv[2], b"pong %d" % child, 1)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_killed_same_host_peer_is_dead_before_its_sockets_close(engine_factory):
    """A same-host peer that is killed is DEAD through its liveness lock (released by the kernel
    when its I/O thread dies), even while a forked child keeps its sockets open and heartbeats
    would take a minute."""
    import subprocess
    import sys

    from mooncake.transfer import PeerState

    w = engine_factory("watcher-lock", heartbeat_timeout=60.0)
    p = subprocess.Popen([sys.executable, "-c", _FORKING_VICTIM, w.endpoint, w.name])
    child = 0
    try:
        hi = w.recv_notify(None, 1, timeout=30)
        assert hi is not None
        assert hi.data == b"hi"
        victim = hi.peer
        w.notify(victim, b"ping", 1)  # opens the ring to the victim: the watch starts here
        pong = w.recv_notify(victim, 1, timeout=30).data
        assert pong.startswith(b"pong ")
        child = int(pong.split()[1])
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        while w.peer_state(victim) != PeerState.DEAD and time.monotonic() - t0 < 10:
            time.sleep(0.001)
        took = time.monotonic() - t0
        assert w.peer_state(victim) == PeerState.DEAD, f"not DEAD {took:.1f} s after the kill"
        assert took < 3.0
    finally:
        p.kill()
        p.wait()
        if child:
            os.kill(child, signal.SIGKILL)
