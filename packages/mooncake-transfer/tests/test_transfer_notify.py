"""Notification channels: same-host shared-memory ring and TCP, one FIFO order across both."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from mooncake.transfer import PeerDeadError

KiB = 1024


def _check_in_order(eng, peer_name, sizes, tag, timeout=10):
    for i, size in enumerate(sizes):
        n = eng.recv_notify(peer_name, tag, timeout)
        assert n is not None, f"message {i} missing"
        assert int.from_bytes(n.data[:4], "little") == i, (
            f"got message {int.from_bytes(n.data[:4], 'little')} at {i}"
        )
        assert len(n.data) == max(size, 4)
        assert n.data[4:] == bytes([i % 251]) * (len(n.data) - 4)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ring", ["1", "0"])
def test_mixed_sizes_keep_fifo_across_ring_and_tcp(engine_factory, peer_factory, monkeypatch, ring):
    monkeypatch.setenv("MOONCAKE_NOTIFY_RING", ring)
    eng = engine_factory(f"recv-ring{ring}")
    peer = peer_factory(f"send-ring{ring}", env={"MOONCAKE_NOTIFY_RING": ring})
    assert peer.request(op="connect", endpoint=eng.endpoint)["ok"]
    rnd = random.Random(7)
    sizes = [rnd.choice([1, 8, 100, 4 * KiB, 60 * KiB, 70 * KiB, 200 * KiB]) for _ in range(300)]
    peer.send_only(op="notify_many", peer=eng.name, tag=3, sizes=sizes)
    _check_in_order(eng, peer.name, sizes, 3)
    assert peer.read_reply()["ok"]
    stats = peer.request(op="stats")
    assert stats["notify_ring_sent"] + stats["notify_tcp_sent"] == len(sizes)
    if ring == "1":  # small ones took the ring (all but the first, which set it up)
        assert stats["notify_ring_sent"] > 0.5 * sum(s <= 64 * KiB for s in sizes), stats
    else:
        assert stats["notify_ring_sent"] == 0


@pytest.mark.timeout(60)
def test_full_ring_falls_back_to_tcp_in_order(engine_factory, peer_factory):
    eng = engine_factory("slow-reader")
    peer = peer_factory("fast-writer")
    assert peer.request(op="connect", endpoint=eng.endpoint)["ok"]
    sizes = [32 * KiB] * 200  # 6.4 MB: several times the 1 MiB ring, nobody reading meanwhile
    assert peer.request(op="notify_many", peer=eng.name, tag=1, sizes=sizes)["ok"]
    _check_in_order(eng, peer.name, sizes, 1)


@pytest.mark.timeout(60)
def test_messages_sent_before_death_are_delivered_then_peer_dead(engine_factory, peer_factory):
    eng = engine_factory("heir")
    peer = peer_factory("testator")
    assert peer.request(op="connect", endpoint=eng.endpoint)["ok"]
    sizes = [16, 100 * KiB, 16, 16]  # ring, tcp, ring, ring
    assert peer.request(op="notify_many", peer=eng.name, tag=2, sizes=sizes)["ok"]
    os.kill(peer.pid, signal.SIGKILL)
    peer.proc.wait(5)
    time.sleep(0.2)
    _check_in_order(eng, peer.name, sizes, 2)
    with pytest.raises(PeerDeadError):
        eng.recv_notify(peer.name, 2, timeout=None)


@pytest.mark.timeout(60)
def test_ring_pingpong_wakes_sleeping_receiver(engine_factory, peer_factory):
    """The receiver sleeps well past its spin: the sender's doorbell futex must wake it."""
    eng = engine_factory("pp-a")
    peer = peer_factory("pp-b")
    eng.connect(peer.endpoint)
    peer.send_only(op="echo", peer=eng.name, tag=0, count=20, timeout=10)
    for i in range(20):
        time.sleep(0.01)  # the echoing side is asleep in recv_notify by now
        t0 = time.monotonic()
        eng.notify(peer.name, b"%d" % i)
        n = eng.recv_notify(peer.name, 0, timeout=5)
        assert n is not None
        assert n.data == b"%d" % i
        assert time.monotonic() - t0 < 0.5
    assert peer.read_reply()["ok"]
