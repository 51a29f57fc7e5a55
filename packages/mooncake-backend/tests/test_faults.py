"""Real kill -9 at random points inside ops; survivors agree and never hang."""

import os
import random
import time

import pytest
from fault_cases import allreduce_loop, allreduce_loop_lane
from harness import Ranks

from mooncake.backend.faults import POINTS  # step points and the native wire_* points

TRIALS = int(os.environ.get("MOONCAKE_FAULT_TRIALS", "2"))


def check_survivors(res: dict, victim: int, world: int, kinds: dict) -> None:
    logs = {r: v[1] for r, v in res.items() if r != victim}
    for r, (status, detail) in res.items():
        if r != victim:
            assert status == "ok", f"survivor {r} {status}:\n{detail}"
    ref = None
    for r, log in logs.items():
        rows = [(i, kind, got, mask) for (i, kind, got, mask, _) in log]
        if ref is None:
            ref = rows
        assert rows == ref, f"survivors disagree: rank {r} vs first survivor"
    full = (1 << world) - 1
    for i, kind, got, mask in ref:
        assert not (mask >> victim & 1) or mask == full
        assert mask | (1 << victim) == full, f"op {i}: unexpected mask {mask:b}"
        if kind in ("all_reduce", "all_gather", "all_gather_single", "reduce_scatter_single"):
            assert got == mask, f"op {i} {kind}: result {got:b} != contributors {mask:b}"
        elif kind == "broadcast":
            root = i % world
            if mask >> root & 1:
                assert got == 1 << root
            else:
                assert got is None
    assert ref[-1][3] == full & ~(1 << victim), "victim still active at the end"


def run_trial(world, victim, point, nth, ops, sizes, iters=12):
    with Ranks(timeout=90) as rk:
        for r in range(world):
            env = {"MOONCAKE_FAULT": f"{point}:{nth}"} if r == victim else {}
            rk.start(allreduce_loop, r, world, iters, sizes, ops, key=r, env=env)
        res = rk.collect(range(world))
    assert res[victim][0] == "died", f"victim did not die: {res[victim]}"
    check_survivors(res, victim, world, ops)


def kill_during_loop(tmp_path, body, world, victim, settle, iters, sizes, ops) -> dict:
    """Ranks loop ``body`` (``allreduce_loop``'s arguments, 2 ms apart); once every rank is in
    its loop and ``settle`` s more have passed, ``victim`` is killed from outside (SIGKILL).
    Returns every rank's (status, result)."""
    ready = str(tmp_path / "ready")
    with Ranks(timeout=120) as rk:
        for r in range(world):
            rk.start(body, r, world, iters, sizes, ops, 0.002, ready, key=r)
        deadline = time.monotonic() + 90
        while not all(os.path.exists(f"{ready}.{r}") for r in range(world)):
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.05)
        time.sleep(settle)
        rk.kill(victim)
        return rk.collect(range(world))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [3, 4])
def test_kill_at_random_points_every_victim(world):
    rng = random.Random(1234 + world)
    for victim in range(world):
        for _ in range(TRIALS):
            point = rng.choice(POINTS)
            nth = rng.randint(1, 8)
            ops = rng.choice(
                [
                    ("all_reduce",),
                    ("all_reduce", "all_gather", "broadcast", "barrier", "reduce_scatter_single"),
                ]
            )
            sizes = rng.choice([(4,), (200000,), (4, 200000)])
            run_trial(world, victim, point, nth, ops, sizes)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", ["wire_send", "wire_land", "wire_then"])
def test_kill_inside_the_fused_native_round(point):
    # Small all_reduces take the fused native round (data, vote, DECIDED and fold in one call);
    # the wire_* points kill the victim between two peers' messages inside that call.
    for world, victim, nth in ((3, 0, 5), (3, 2, 7), (4, 1, 10)):
        run_trial(world, victim, point, nth, ("all_reduce",), (4,))
    # All_gather and reduce_scatter take the same fused round.
    run_trial(3, 1, point, 6, ("all_gather", "reduce_scatter_single"), (4,))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", ["data_send", "data_recv", "agree_send", "pre_commit"])
def test_kill_during_rooted_ops(point):
    # reduce, gather and scatter (roots 0, 1, 2 in turn): the root checks its result against
    # active_ranks, a scatter from a failed root leaves every survivor's output unchanged. Rank 2
    # receives nothing (it only roots the scatters), so the victims are the receiving roots.
    for victim, nth in ((0, 2), (1, 3)):
        run_trial(3, victim, point, nth, ("reduce", "gather", "scatter"), (4, 3000))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "ops",
    [
        ("all_reduce",),
        ("broadcast",),
        ("all_gather", "all_gather_single"),
        ("reduce_scatter_single",),
        ("broadcast", "all_reduce", "all_gather", "reduce_scatter_single"),
    ],
)
def test_small_op_lane_hands_a_failed_op_to_the_protocol(tmp_path, ops):
    """Small all_reduces, broadcasts, all_gathers and reduce_scatters finish in the lane (one
    native call, no protocol objects) while all is clean; the op a kill -9 interrupts is handed to
    the protocol, which excludes the victim and re-runs it among the survivors: every all_reduce
    result is the mask of the ranks that contributed, every broadcast the root's value (or
    unchanged everywhere when the root is the victim), every all_gather the contributors' slots
    with the victim's zeroed, every reduce_scatter chunk the mask of its contributors."""
    world, victim = 3, 1
    res = kill_during_loop(tmp_path, allreduce_loop_lane, world, victim, 0.2, 300, (16,), ops)
    logs = {r: (st, v[0] if st == "ok" else v) for r, (st, v) in res.items()}
    check_survivors(logs, victim, world, None)
    for r in range(world):
        if r == victim:
            continue
        clean, resumed = res[r][1][1]
        assert clean >= 50, f"rank {r}: only {clean} ops finished in the lane"
        assert resumed >= 1, f"rank {r}: no op was handed to the protocol after the kill"


@pytest.mark.timeout(300)
def test_external_kill_during_loop_latency(tmp_path):
    """kill -9 from outside while the ranks loop all_reduce: survivors' op returns quickly."""
    world, victim = 4, 2
    res = kill_during_loop(
        tmp_path, allreduce_loop, world, victim, 0.3, 400, (256,), ("all_reduce",)
    )
    check_survivors(res, victim, world, None)
    for r, (_status, log) in res.items():
        if r == victim:
            continue
        worst = max(dt for (_, _, _, _, dt) in log)
        assert worst < 2.0, f"rank {r}: an op took {worst:.3f} s"
