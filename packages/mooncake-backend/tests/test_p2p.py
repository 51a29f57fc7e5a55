"""Point-to-point: any size byte-exact, streams that stay in step, bounded threads, ordering,
and peers killed (SIGKILL) in the middle of a large message. Real processes.

Large messages are pulled by the receiver by default; "inline" forces the sender to send them
in parts (the path below ``p2p.PULL_MIN``), so both paths are covered at every size."""

from __future__ import annotations

import pytest
from harness import Ranks, run_world
from p2p_cases import (
    order_body,
    receiver_killed_body,
    sender_killed_body,
    sizes_body,
    stream_body,
    tags_body,
)

MiB = 1 << 20


def _report(mode: str, times: dict) -> None:
    for n, s in times.items():
        print(f"p2p {mode} {n} bytes: {s * 1e3:.1f} ms ({n / max(s, 1e-9) / 1e9:.2f} GB/s)")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["pull", "inline"])
def test_send_recv_1_byte_and_64_mib_plus_1_byte_exact(mode):
    sizes = [1, 0, 64 * MiB + 1, 5 * MiB - 3, 3 * MiB + 1]
    times = run_world(sizes_body, 2, sizes, mode, timeout=100)[1]
    assert sorted(times) == sorted(sizes)
    _report(mode, times)


@pytest.mark.timeout(180)
def test_send_recv_512_mib_exact():
    times = run_world(sizes_body, 2, [512 * MiB], "pull", timeout=160)[1]
    _report("pull", times)


@pytest.mark.timeout(180)
def test_send_recv_512_mib_exact_inline():
    times = run_world(sizes_body, 2, [512 * MiB], "inline", timeout=160)[1]
    _report("inline", times)


@pytest.mark.timeout(120)
def test_stream_stays_in_step_after_mismatch_failed_send_and_deadline():
    seen = run_world(stream_body, 2, timeout=100)
    assert len(seen[0]) == 1, seen
    assert len(seen[1]) == 6, seen
    for msg in seen[0] + seen[1]:
        print(msg)


@pytest.mark.timeout(120)
def test_1000_distinct_tags_do_not_grow_threads():
    base, peak = run_world(tags_body, 2, 1000, timeout=100)[1]
    assert peak - base <= 2, f"threads grew from {base} to {peak} for 1000 tags"


@pytest.mark.timeout(120)
def test_order_anysource_deadline_and_batch_isend_irecv():
    assert all(run_world(order_body, 3, timeout=100).values())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["inline", "pull"])
def test_sender_killed_mid_message_fails_the_receive(mode):
    with Ranks(timeout=100) as r:
        for rank in range(2):
            r.start(sender_killed_body, rank, 2, 64 * MiB, mode)
        res = r.collect(range(2))
    assert res[0][0] == "died", res[0]
    status, detail = res[1]
    assert status == "ok", detail
    took, msg, ranks, later = detail
    assert ranks == [0], ranks
    if mode == "inline":
        assert "rank 0 failed after sending" in msg, msg
    assert took < 30, took
    assert later < 5, later
    print(f"receiver raised after {took:.2f} s: {msg}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["inline", "pull"])
def test_receiver_killed_mid_message(mode):
    with Ranks(timeout=100) as r:
        for rank in range(2):
            r.start(receiver_killed_body, rank, 2, 64 * MiB, mode)
        res = r.collect(range(2))
    assert res[1][0] == "died", res[1]
    status, detail = res[0]
    assert status == "ok", detail
    if mode == "pull":
        assert detail == (0,), f"staging memory for {detail[0]} messages was not freed"
        return
    msg, ranks = detail
    assert ranks == [1], ranks
    assert "send to rank 1" in msg, msg
    assert "failed after" in msg, msg
    print(msg)
