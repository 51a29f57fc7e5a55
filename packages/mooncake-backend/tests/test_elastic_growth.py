"""Growth and joining as real clients use them (issue 12): extend without max_world_size, new ranks
with a plain init, the join window, get_num_synced_ranks, deferred join with a positional
is_extension, SGLang's positional max_world_size, and set_default_device('meta')."""

import pytest
import torch
from elastic_cases import (
    cuda_growth,
    default_device_meta,
    deferred_joiner,
    deferred_member,
    grow_new,
    grow_old,
    peer_state_of_dead_member,
    sglang_new_rank,
    sglang_options,
    sglang_recover_joiner,
    sglang_recover_member,
    window_new,
    window_old,
)
from harness import Ranks, run_world


def _ok(res):
    for k, (status, detail) in res.items():
        assert status == "ok", f"{k} {status}:\n{detail}"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("meta", [False, True], ids=["plain", "default-device-meta"])
def test_extend_without_max_world_size_plain_new_ranks(meta):
    """Old ranks: world 2, no pg_options; extend_group_size_to(WORLD, 4) returns before the new
    ranks even start (they wait for its return), and the next op is a full 4-rank op. New ranks:
    plain init_process_group(world_size=4), no is_extension: their first op is that op."""
    with Ranks(timeout=170) as rk:
        for r in range(2):
            rk.start(grow_old, r, 2, 4, 60.0, meta)
        for r in (2, 3):
            rk.start(grow_new, r, 4, 4, 2)
        res = rk.collect(range(4))
    _ok(res)
    for r in range(2):
        assert res[r][1] < 10.0, f"extend_group_size_to took {res[r][1]:.1f} s on rank {r}"


@pytest.mark.timeout(200)
def test_new_rank_missing_the_join_window_counts_as_failed_then_joins_late():
    """extend 2 -> 4 with a 4 s window; rank 3 is not there: the first op waits the window,
    completes among ranks 0-2 (active [1,1,1,0]); rank 3 then starts (plain init) and is
    admitted through get_peer_state / recover_ranks."""
    window = 4.0
    with Ranks(timeout=170) as rk:
        for r in range(2):
            rk.start(window_old, r, 2, 4, window)
        rk.start(window_new, 2, 4, 4, False)
        rk.start(window_new, 3, 4, 4, True)
        res = rk.collect(range(4))
    _ok(res)
    for r in range(2):
        waited = res[r][1]
        assert window * 0.9 <= waited < window + 30, f"rank {r}: first op took {waited:.1f} s"


@pytest.mark.timeout(200)
def test_deferred_join_after_a_rank_simply_exits():
    """get_num_synced_ranks polled to the world size; rank 1 returns (process exits normally);
    the others go on without it; a replacement with MooncakeBackendOptions(ones, True) runs
    local-only, then join_group; survivors get_peer_state / recover_ranks."""
    world, broken = 4, 1
    with Ranks(timeout=170) as rk:
        for r in range(world):
            rk.start(deferred_member, r, world, broken, key=(r, 0))
        rk.start(deferred_joiner, broken, world, key=(broken, 1))
        res = rk.collect([(r, 0) for r in range(world)] + [(broken, 1)])
        rk.procs[(broken, 0)].join(timeout=30)
        assert rk.procs[(broken, 0)].exitcode == 0
    _ok(res)
    # (both incarnations report as rank 1: the harness cannot tell which result is whose)
    assert sorted([res[(broken, 0)][1], res[(broken, 1)][1]]) == ["left", "ok"]
    assert all(res[(r, 0)][1] == "ok" for r in range(world) if r != broken)


@pytest.mark.timeout(120)
def test_peer_state_of_a_member_that_just_died_is_false():
    """A member dies and the survivors' next call is get_peer_state for it: False, and it is
    excluded (before the fix the dead incarnation counted as a connected member)."""
    world, victim = 3, 2
    with Ranks(timeout=100) as rk:
        for r in range(world):
            rk.start(peer_state_of_dead_member, r, world, victim)
        res = rk.collect([r for r in range(world) if r != victim])
    _ok(res)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("local_sync", [False, True], ids=["global-sync", "local-sync"])
def test_sglang_positional_max_world_size_and_long_active_ranks(local_sync):
    world, max_ws = 2, 4
    with Ranks(timeout=170) as rk:
        for r in range(world):
            rk.start(sglang_options, r, world, max_ws, local_sync)
        rk.start(sglang_new_rank, world, world, max_ws)
        res = rk.collect(range(world + 1))
    _ok(res)


@pytest.mark.timeout(200)
def test_sglang_recovery_flow_world_then_subgroups():
    """elastic_ep.try_recover_ranks: survivors recover WORLD, then poll get_peer_state and call
    recover_ranks on each subgroup (the joiner does not take part: join_group only); the
    replacement created its subgroups with recovered_rank=True before joining."""
    world, victim = 3, 1
    with Ranks(timeout=170) as rk:
        for r in range(world):
            rk.start(sglang_recover_member, r, world, victim, key=(r, 0))
        rk.procs[(victim, 0)].join(timeout=60)
        assert rk.procs[(victim, 0)].exitcode == -9
        rk.start(sglang_recover_joiner, victim, world, victim, key=(victim, 1))
        res = rk.collect([(r, 0) for r in range(world) if r != victim] + [(victim, 1)])
    _ok(res)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("with_options", [False, True], ids=["no-options", "options"])
def test_internal_allocations_ignore_set_default_device(with_options):
    res = run_world(default_device_meta, 2, with_options, timeout=120)
    assert all(v == 8 for v in res.values()), res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(300)
def test_cuda_growth_with_default_device_cuda():
    with Ranks(timeout=280) as rk:
        for r in range(3):
            rk.start(cuda_growth, r, 2, 3)
        res = rk.collect(range(3))
    _ok(res)


def test_options_positional_max_world_size():
    from mooncake import pg

    active = torch.zeros(8, dtype=torch.int32)
    o = pg.MooncakeBackendOptions(active, True, 8)
    assert (o.is_extension, o.max_world_size, o.active_ranks is active) == (True, 8, True)
    assert pg.MooncakeBackendOptions(active, False, torch.tensor(8)).max_world_size == 8
    for bad, exc in ((True, TypeError), ("8", TypeError), (0, ValueError)):
        with pytest.raises(exc, match="max_world_size"):
            pg.MooncakeBackendOptions(active, False, bad)
    for name in (
        "MooncakeBackendOptions",
        "extend_group_size_to",
        "get_active_ranks",
        "get_num_synced_ranks",
        "get_peer_state",
        "join_group",
        "recover_ranks",
        "set_host_ip",
    ):
        assert callable(getattr(pg, name)), name
