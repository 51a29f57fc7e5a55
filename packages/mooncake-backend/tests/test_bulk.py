"""Large all_reduce / broadcast / all_gather through shared-memory arenas (``backend/bulk.py``):
results vs gloo in the same processes, the cross-host protocol, and real kill -9 inside large
ops."""

import random

import pytest
from fault_cases import allreduce_loop
from harness import run_world
from test_faults import run_trial


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_large_allreduce_and_broadcast_match_gloo(world):
    from bulk_cases import bulk_vs_gloo_body

    res = run_world(bulk_vs_gloo_body, world, timeout=280)
    for r, stats in res.items():
        assert stats["checks"] > 50, (r, stats)
        # The arena path ran (WORLD and the subgroup) and read every peer through a mapping.
        assert stats["arenas"] >= 2, (r, stats)
        assert stats["mapped"] >= world - 1, (r, stats)
        assert stats["unmapped"] == 0, (r, stats)


@pytest.mark.timeout(200)
def test_cross_host_protocol_with_engine_reads():
    """Distinct host ids: no shared-memory mapping (TCP), REDUCED round + one-sided reads."""
    from bulk_cases import large_loop_body

    world = 3
    from harness import Ranks

    with Ranks(timeout=180) as rk:
        for r in range(world):
            rk.start(large_loop_body, r, world, 4, env={"MOONCAKE_HOST_ID": f"test-host-{r}"})
        res = rk.collect(range(world))
    for r, (status, stats) in res.items():
        assert status == "ok", f"rank {r} {status}:\n{stats}"
        assert stats["mapped"] == 0, stats
        assert stats["unmapped"] >= world - 1, stats


# (point, nth): during the READY round (after the first/second message left), after a READY
# arrived, inside the agreement, between agreement and commit, after the commit.
BULK_POINTS = [
    ("data_send", 1),
    ("data_send", 2),
    ("data_recv", 1),
    ("data_recv", 3),
    ("agree_send", 1),
    ("pre_commit", 2),
    ("post_commit", 1),
]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [3, 4])
def test_kill_during_large_allreduce(world):
    """Survivors agree, results equal the reduction over the contributors active_ranks shows."""
    rng = random.Random(77 + world)
    for i, (point, nth) in enumerate(BULK_POINTS):
        victim = [0, world - 1, rng.randrange(world)][i % 3]
        ops = ("all_reduce",) if i % 2 else ("all_reduce", "broadcast")
        # 100_000 int64 = 800 KB: the arena path.
        run_trial(world, victim, point, nth, ops, (100_000,), iters=8)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [3, 4])
def test_kill_during_large_allgather(world):
    """Survivors agree; each all_gather's slots hold exactly the contributors active_ranks shows
    (the dead rank's slot zeroed from the op that excluded it on: uneven membership)."""
    rng = random.Random(91 + world)
    for i, (point, nth) in enumerate(BULK_POINTS):
        victim = [world - 1, 0, rng.randrange(world)][i % 3]
        ops = ("all_gather",) if i % 2 else ("all_gather", "broadcast")
        # 100_000 int64 = 800 KB; 8191 int64 just below the arena threshold, 8192 at it.
        sizes = (100_000,) if i % 3 else (100_000, 8191, 8192)
        run_trial(world, victim, point, nth, ops, sizes, iters=8)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", ["wire_send", "wire_land", "wire_then"])
def test_kill_inside_the_fused_ready_table_round(point):
    """After the first op, large all_gathers and broadcasts run their READY table round, the
    vote and the DECIDED in one native call (every rank predicted every READY); the wire_*
    points kill the victim between two peers' messages inside that call."""
    for world, victim, nth in ((3, 1, 9), (4, 0, 14), (4, 3, 11)):
        run_trial(world, victim, point, nth, ("all_gather", "broadcast"), (100_000,), iters=8)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("point", "nth", "ops"),
    [
        ("data_send", 2, ("all_reduce",)),
        ("data_recv", 2, ("all_reduce",)),
        ("data_recv", 3, ("all_gather", "broadcast")),
    ],
)
def test_kill_during_cross_host_protocol(point, nth, ops):
    """Distinct host ids (REDUCED round, engine reads): a kill -9 inside it, survivors agree."""
    from harness import Ranks
    from test_faults import check_survivors

    world, victim = 3, 1
    with Ranks(timeout=200) as rk:
        for r in range(world):
            env = {"MOONCAKE_HOST_ID": f"test-host-{r}"}
            if r == victim:
                env["MOONCAKE_FAULT"] = f"{point}:{nth}"
            rk.start(allreduce_loop, r, world, 6, (100_000,), ops, key=r, env=env)
        res = rk.collect(range(world))
    assert res[victim][0] == "died", f"victim did not die: {res[victim]}"
    check_survivors(res, victim, world, ops)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_kill_during_large_ops_every_victim_and_point(world):
    for victim in range(world):
        for point, nth in BULK_POINTS:
            run_trial(world, victim, point, nth, ("all_reduce", "broadcast"), (100_000, 7), iters=8)
            run_trial(world, victim, point, nth, ("all_gather", "broadcast"), (100_000,), iters=8)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_large_allgather_every_dtype_around_the_threshold(world):
    from bulk_cases import allgather_body

    res = run_world(allgather_body, world, timeout=280)
    for r, stats in res.items():
        assert stats["checks"] > 150, (r, stats)
        assert stats["mapped"] >= world - 1, (r, stats)
        assert stats["unmapped"] == 0, (r, stats)
        # Most READY tables matched this rank's predictions (the one-native-call path); the
        # first op of each arena half and each growth fall back to the step-by-step path.
        assert stats["predicted"] > 100, (r, stats)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_one_broadcast_op_of_several_tensors(world):
    from bulk_cases import multi_tensor_broadcast_body

    res = run_world(multi_tensor_broadcast_body, world, timeout=100)
    assert all(v >= 4 * world for v in res.values()), res
