"""Rank bodies for test_p2p.py: send / recv of any size, message streams that stay in step,
bounded threads, ordering, and peers killed in the middle of a multi-part message."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from harness import client_store, init

MiB = 1 << 20


def payload(n: int, seed: int) -> torch.Tensor:
    """``n`` random bytes (uint8), the same for the same seed in every process."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=g)
    return words.view(torch.uint8)[:n]


def same(got: torch.Tensor, exp: torch.Tensor, what: str) -> None:
    if not torch.equal(got, exp):
        bad = (got != exp).nonzero()
        first = int(bad[0]) if len(bad) else -1
        raise AssertionError(f"{what}: {len(bad)} bytes differ, the first at offset {first}")


def raises(exc_type, fn, what: str):
    """Run ``fn``; return the ``exc_type`` it raised (AssertionError if it raised nothing)."""
    try:
        fn()
    except exc_type as e:
        return e
    raise AssertionError(f"{what}: did not raise {exc_type.__name__}")


def backend():
    return dist.group.WORLD._get_backend(torch.device("cpu"))


def set_mode(mode: str) -> None:
    """This process sends large messages "pull"ed (the default) or "inline" in parts."""
    from mooncake.backend import p2p

    if not hasattr(p2p, "_default_pull_min"):
        p2p._default_pull_min = p2p.PULL_MIN
    p2p.PULL_MIN = p2p._default_pull_min if mode == "pull" else 1 << 62


def outstanding() -> int:
    """Pulled messages this process sent whose receiver has not acknowledged them yet."""
    from mooncake.backend import p2p

    return len(p2p._state(backend()).outstanding)


def hook_parts(fn) -> None:
    """Call ``fn(k)`` before the k-th message part this process sends (1-based); None: unhook."""
    from mooncake.backend import p2p

    if not hasattr(p2p, "_orig_send_part"):
        p2p._orig_send_part = p2p._send_part
    orig = p2p._orig_send_part
    if fn is None:
        p2p._send_part = orig
        return
    count = [0]

    def part(*args):
        count[0] += 1
        fn(count[0])
        return orig(*args)

    p2p._send_part = part


def sizes_body(rank: int, world: int, port: int, sizes: list[int], mode: str) -> dict:
    """Rank 0 sends each size to rank 1 (random bytes); rank 1 checks every byte. Returns rank 1's
    time per size: from the barrier both pass to the receive's completion (the whole transfer)."""
    init(rank, world, port)
    set_mode(mode)
    times = {}
    for i, n in enumerate(sizes):
        seed = 1000 + i
        if rank == 0:
            x = payload(n, seed)
            dist.barrier()
            dist.send(x, 1, tag=i)
            del x
        else:
            out = torch.empty(n, dtype=torch.uint8).fill_(7)  # pages touched: time the transfer
            dist.barrier()
            t0 = time.perf_counter()
            dist.recv(out, 0, tag=i)
            times[n] = time.perf_counter() - t0
            same(out, payload(n, seed), f"{n} bytes")
            del out
        dist.barrier()
    dist.destroy_process_group()
    return times


def stream_body(rank: int, world: int, port: int) -> list:
    """One (source, tag) channel stays in step after: a size mismatch (small and multi-part), a
    sender whose send failed in the middle of a message, and a receive whose deadline passed in
    the middle of a message (the rest of that message is skipped)."""
    from mooncake.backend.p2p import PART_BYTES
    from mooncake.pg import RankFailureError
    from mooncake.transfer import TransferError

    init(rank, world, port)
    set_mode("inline")
    store = client_store(port)
    seen = []
    if rank == 0:
        dist.send(payload(1000, 1), 1, tag=3)
        dist.send(payload(2000, 2), 1, tag=3)
        dist.send(payload(3 * MiB, 3), 1, tag=3)
        dist.send(payload(3 * MiB + 5, 4), 1, tag=3)

        # the send fails after 2 parts of a 4 MiB message; the next message arrives whole
        def fail(k):
            if k == 3:
                raise TransferError("injected send failure", None, "injected")

        dist.barrier()  # rank 1 has posted its receive
        hook_parts(fail)
        x = payload(4 * MiB, 5)
        e = raises(RankFailureError, lambda: dist.send(x, 1, tag=3), "injected send failure")
        assert f"after {2 * PART_BYTES} of {4 * MiB} bytes" in str(e), str(e)
        assert e.failed_ranks == [1], e.failed_ranks
        seen.append(str(e))
        hook_parts(None)
        dist.send(payload(4 * MiB, 6), 1, tag=3)

        # the sender stalls after 2 parts of an 8 MiB message, past the receiver's deadline
        def stall(k):
            if k == 3:
                time.sleep(1.5)

        dist.barrier()  # rank 1 has posted its receive
        hook_parts(stall)
        dist.send(payload(8 * MiB, 7), 1, tag=3)
        hook_parts(None)
        dist.send(payload(8 * MiB, 8), 1, tag=3)

        # the same, but rank 1 posts its receive after the first parts arrived
        def stall_and_tell(k):
            if k == 3:
                store.set("p2p_parts_sent", "1")
                time.sleep(1.5)

        dist.barrier()
        hook_parts(stall_and_tell)
        dist.send(payload(8 * MiB, 11), 1, tag=3)
        hook_parts(None)
        dist.send(payload(8 * MiB, 12), 1, tag=3)

        # pulled: a size mismatch, then the next message; both staging buffers come back
        set_mode("pull")
        dist.send(payload(6 * MiB, 9), 1, tag=3)
        dist.send(payload(6 * MiB + 1, 10), 1, tag=3)
        dist.barrier()
        deadline = time.monotonic() + 10
        while outstanding() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outstanding() == 0, f"{outstanding()} pulled messages not acknowledged"
    else:
        small = torch.empty(500, dtype=torch.uint8)
        e = raises(ValueError, lambda: dist.recv(small, 0, tag=3), "1000 bytes into 500")
        assert "1000 bytes" in str(e), str(e)
        assert "500 bytes" in str(e), str(e)
        seen.append(str(e))
        out = torch.empty(2000, dtype=torch.uint8)
        dist.recv(out, 0, tag=3)
        same(out, payload(2000, 2), "after a small size mismatch")
        small = torch.empty(MiB, dtype=torch.uint8)
        e = raises(ValueError, lambda: dist.recv(small, 0, tag=3), "3 MiB into 1 MiB")
        assert f"{3 * MiB} bytes" in str(e), str(e)
        assert f"{MiB} bytes" in str(e), str(e)
        seen.append(str(e))
        out = torch.empty(3 * MiB + 5, dtype=torch.uint8)
        dist.recv(out, 0, tag=3)
        same(out, payload(3 * MiB + 5, 4), "after a multi-part size mismatch")

        out = torch.empty(4 * MiB, dtype=torch.uint8)
        w = dist.irecv(out, 0, tag=3)
        dist.barrier()
        e = raises(RankFailureError, w.wait, "a message the sender gave up on")
        assert "gave up" in str(e), str(e)
        assert e.failed_ranks == [0], e.failed_ranks
        seen.append(str(e))
        dist.recv(out, 0, tag=3)
        same(out, payload(4 * MiB, 6), "after a message the sender gave up on")

        out = torch.empty(8 * MiB, dtype=torch.uint8)
        t0 = time.monotonic()
        with backend().op_timeout(0.5):
            w = dist.irecv(out, 0, tag=3)
        dist.barrier()
        e = raises(TimeoutError, w.wait, "a stalled message")
        took = time.monotonic() - t0
        assert f"of {8 * MiB} bytes" in str(e), str(e)
        assert 0.4 < took < 3.0, took  # the op timeout would be 60 s
        seen.append(str(e))
        dist.recv(out, 0, tag=3)
        same(out, payload(8 * MiB, 8), "after a receive that timed out mid-message")

        dist.barrier()
        store.wait(["p2p_parts_sent"])
        time.sleep(0.2)  # the first parts are here: the receive joins a message in flight
        t0 = time.monotonic()
        with backend().op_timeout(0.5):
            w = dist.irecv(out, 0, tag=3)
        e = raises(TimeoutError, w.wait, "a stalled message joined in flight")
        took = time.monotonic() - t0
        assert f"of {8 * MiB} bytes" in str(e), str(e)
        assert 0.4 < took < 3.0, took  # the op timeout would be 60 s
        seen.append(str(e))
        dist.recv(out, 0, tag=3)
        same(out, payload(8 * MiB, 12), "after a receive that joined a message and timed out")

        small = torch.empty(5 * MiB, dtype=torch.uint8)
        e = raises(ValueError, lambda: dist.recv(small, 0, tag=3), "pulled 6 MiB into 5 MiB")
        assert f"{6 * MiB} bytes" in str(e), str(e)
        assert f"{5 * MiB} bytes" in str(e), str(e)
        seen.append(str(e))
        out = torch.empty(6 * MiB + 1, dtype=torch.uint8)
        dist.recv(out, 0, tag=3)
        same(out, payload(6 * MiB + 1, 10), "after a pulled size mismatch")
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    return seen


def tags_body(rank: int, world: int, port: int, n: int) -> tuple[int, int]:
    """``n`` distinct tags: receives posted before the messages, then messages before the
    receives (random order). Returns rank 1's (threads at the start, most threads seen)."""
    init(rank, world, port)
    base = peak = 0
    if rank == 1:
        dist.recv(torch.empty(1, dtype=torch.int64), 0, tag=10 * n)  # the progress thread runs
        base = threading.active_count()
        bufs = [torch.full((1,), -1, dtype=torch.int64) for _ in range(n)]
        works = [dist.irecv(bufs[t], 0, tag=t) for t in range(n)]
        peak = threading.active_count()
        dist.barrier()
        for t in reversed(range(n)):
            works[t].wait()
            peak = max(peak, threading.active_count())
        got = [int(b) for b in bufs]
        assert got == [7 * t for t in range(n)], got[:10]
        dist.barrier()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
        for t in order:
            b = torch.empty(1, dtype=torch.int64)
            dist.recv(b, 0, tag=n + t)
            assert int(b) == 11 * t, (t, int(b))
            peak = max(peak, threading.active_count())
        # shutting the group's p2p down fails a pending receive and ends the progress thread
        from mooncake.backend import p2p
        from mooncake.backend.errors import MooncakeBackendError

        w = dist.irecv(torch.empty(1), 0, tag=3 * n)
        p2p.shutdown(backend())
        e = raises(MooncakeBackendError, w.wait, "a receive pending at shutdown")
        assert "destroyed" in str(e), str(e)
        deadline = time.monotonic() + 2
        while threading.active_count() >= base and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threading.active_count() == base - 1, (base, threading.active_count())
    else:
        dist.send(torch.zeros(1, dtype=torch.int64), 1, tag=10 * n)
        dist.barrier()
        for t in reversed(range(n)):
            dist.send(torch.tensor([7 * t]), 1, tag=t)
        for t in range(n):
            dist.send(torch.tensor([11 * t]), 1, tag=n + t)
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    return base, peak


ORDER_SIZES = [2 * MiB, 6 * MiB + 1, 5 * MiB]  # inline in parts, pulled, pulled


def order_body(rank: int, world: int, port: int) -> bool:
    """World 3. Posting order on one channel (multi-part messages, waited in reverse); an
    unanswered receive delays no other channel and completes when answered late; a deadline;
    any-source receives; batch_isend_irecv with irecv first and with isend first."""
    init(rank, world, port)
    if rank == 1:
        lonely = dist.irecv(torch.zeros(3), src=0, tag=77)
        ws = [
            dist.irecv(torch.empty(ORDER_SIZES[k], dtype=torch.uint8), 0, tag=5) for k in range(3)
        ]
        dist.barrier()  # rank 0 sends tag 5 now
        t0 = time.monotonic()
        out = torch.empty(100, dtype=torch.uint8)
        dist.recv(out, 2, tag=6)
        assert time.monotonic() - t0 < 10
        same(out, payload(100, 60), "tag 6 with an unanswered receive pending")
        for k in reversed(range(3)):
            ws[k].wait()
        for k in range(3):
            same(ws[k].result()[0], payload(ORDER_SIZES[k], 50 + k), f"message {k} of tag 5")
        try:
            lonely.wait(timeout=0.2)
            raise AssertionError("an unanswered irecv completed")
        except TimeoutError:
            pass
        t0 = time.monotonic()
        with backend().op_timeout(0.3):
            w = dist.irecv(torch.empty(1), 2, tag=99)
        e = raises(TimeoutError, w.wait, "a receive nobody answers")
        took = time.monotonic() - t0
        assert 0.25 < took < 3.0, took
        assert "rank 2" in str(e), str(e)
        srcs = {}
        for _ in range(2):
            out = torch.empty(64, dtype=torch.uint8)
            s = dist.recv(out, tag=9)
            srcs[s] = out
        assert sorted(srcs) == [0, 2], sorted(srcs)
        for s, out in srcs.items():
            same(out, payload(64, 90 + s), f"any-source message from rank {s}")
    elif rank == 0:
        dist.barrier()
        for k in range(3):
            dist.send(payload(ORDER_SIZES[k], 50 + k), 1, tag=5)
        dist.send(payload(64, 90), 1, tag=9)
    else:
        dist.barrier()
        dist.send(payload(100, 60), 1, tag=6)
        time.sleep(0.2)
        dist.send(payload(64, 92), 1, tag=9)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    n = 8 * MiB + 3
    for first in ("irecv", "isend"):
        out = torch.empty(n, dtype=torch.uint8)
        ops = [
            dist.P2POp(dist.irecv, out, prv, tag=200),
            dist.P2POp(dist.isend, payload(n, 300 + rank), nxt, tag=200),
        ]
        for w in dist.batch_isend_irecv(ops if first == "irecv" else ops[::-1]):
            w.wait()
        same(out, payload(n, 300 + prv), f"batch_isend_irecv, {first} first")
    dist.barrier()
    if rank == 0:
        dist.send(torch.tensor([1.0, 2.0, 3.0]), 1, tag=77)
    if rank == 1:
        lonely.wait()
        assert lonely.result()[0].tolist() == [1.0, 2.0, 3.0]
    dist.barrier()
    dist.destroy_process_group()
    return True


def sender_killed_body(rank: int, world: int, port: int, n: int, mode: str) -> tuple:
    """Rank 0 dies (SIGKILL) sending an ``n``-byte message to rank 1: "inline", after 20 of its
    parts, rank 1's receive posted before; "pull", right after the message (its descriptor) left,
    rank 1's receive posted once rank 0 is seen dead, so its memory can no longer be read. Rank 1
    returns (seconds to its RankFailureError, the message, failed_ranks, seconds a later
    receive from the dead rank took to fail)."""
    from mooncake.pg import RankFailureError
    from mooncake.transfer import PeerState

    init(rank, world, port, timeout_s=30.0)
    set_mode(mode)
    if rank == 0:

        def die(k):
            if k == 21:
                os.kill(os.getpid(), signal.SIGKILL)

        if mode == "inline":
            hook_parts(die)
        x = payload(n, 5)
        dist.barrier()
        dist.send(x, 1, tag=1)
        os.kill(os.getpid(), signal.SIGKILL)
        return ()
    out = torch.empty(n, dtype=torch.uint8)
    if mode == "inline":
        w = dist.irecv(out, 0, tag=1)
    dist.barrier()
    t0 = time.monotonic()
    if mode == "pull":
        be = backend()
        engine, peer = be._world.mailbox.engine, be.membership.names[0]
        while engine.peer_state(peer) != PeerState.DEAD and time.monotonic() < t0 + 20:
            time.sleep(0.01)
    # (the source may already be out of the membership: then irecv raises at once)
    e = raises(
        RankFailureError,
        lambda: (w if mode == "inline" else dist.irecv(out, 0, tag=1)).wait(),
        "a receive from a killed sender",
    )
    took, msg, ranks = time.monotonic() - t0, str(e), e.failed_ranks
    t1 = time.monotonic()
    raises(RankFailureError, lambda: dist.recv(torch.empty(4), 0, tag=2), "recv from a dead rank")
    return took, msg, ranks, time.monotonic() - t1


def receiver_killed_body(rank: int, world: int, port: int, n: int, mode: str) -> tuple:
    """Rank 0 SIGKILLs rank 1 (the receiver) while sending it an ``n``-byte message: "inline",
    after 20 parts; rank 0 returns (its RankFailureError's message, failed_ranks). "pull": after
    the message left (the send completed); rank 0 returns how many pulled messages it still
    holds staging memory for once it saw rank 1 dead (0: freed)."""
    from mooncake.pg import RankFailureError
    from mooncake.transfer import PeerState

    init(rank, world, port, timeout_s=30.0)
    set_mode(mode)
    store = client_store(port)
    if rank == 1:
        store.set("p2p_receiver_pid", str(os.getpid()))
        out = torch.empty(n, dtype=torch.uint8)
        if mode == "inline":
            w = dist.irecv(out, 0, tag=1)
        dist.barrier()
        if mode == "inline":
            w.wait()
        time.sleep(60)  # killed before
        return ()
    pid = int(store.get("p2p_receiver_pid"))
    be = backend()
    engine, peer = be._world.mailbox.engine, be.membership.names[1]

    def kill_receiver():
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while engine.peer_state(peer) != PeerState.DEAD and time.monotonic() < deadline:
            time.sleep(0.01)

    x = payload(n, 6)
    dist.barrier()
    if mode == "pull":
        dist.send(x, 1, tag=1)
        assert outstanding() == 1, outstanding()
        kill_receiver()
        deadline = time.monotonic() + 5
        while outstanding() and time.monotonic() < deadline:
            time.sleep(0.01)
        return (outstanding(),)
    hook_parts(lambda k: kill_receiver() if k == 21 else None)
    e = raises(RankFailureError, lambda: dist.send(x, 1, tag=1), "a send to a killed receiver")
    return str(e), e.failed_ranks
