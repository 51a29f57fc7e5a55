"""Unit tests of the expert-parallel load balancer (pure torch, no processes)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from mooncake.ep.eplb import (
    ExpertPlacement,
    logical_load_from_physical,
    pack_replicas,
    plan_weight_moves,
    rebalance_experts,
    replicate_experts,
)

pytestmark = pytest.mark.timeout(120)


def _skewed_load(rng: random.Random, num_experts: int, kind: int) -> list[float]:
    if kind == 0:  # Zipf-like, shuffled
        alpha = rng.choice([0.6, 1.0, 1.5])
        load = [1000.0 * (i + 1) ** -alpha for i in range(num_experts)]
        rng.shuffle(load)
        return load
    if kind == 1:  # heavy-tailed
        return [rng.paretovariate(0.8) for _ in range(num_experts)]
    if kind == 2:  # a few hot experts, many idle ones
        return [rng.choice([0.0, 0.0, 1.0, 5.0, 100.0]) for _ in range(num_experts)]
    return [float(rng.randint(0, 50)) for _ in range(num_experts)]


def _random_case(rng: random.Random) -> tuple[list[float], int, int, list[int]]:
    num_ranks = rng.randint(1, 8)
    slots = rng.randint(1, 8)
    num_experts = rng.randint(1, num_ranks * slots + 4)
    active = [0 if rng.random() < 0.25 else 1 for _ in range(num_ranks)]
    return _skewed_load(rng, num_experts, rng.randint(0, 3)), num_ranks, slots, active


def _slot_ranks(p: ExpertPlacement, expert: int) -> list[int]:
    return [s // p.slots_per_rank for s in p.replica_slots(expert)]


def test_uniform_16_experts_in_24_slots_spreads_replicas_over_ranks():
    p = rebalance_experts(torch.ones(16), num_ranks=4, slots_per_rank=6)
    assert p.logcnt.min() >= 1
    assert int(p.logcnt.sum()) == 24
    assert sorted(p.logcnt.tolist()) == [1] * 8 + [2] * 8
    for e in range(16):  # replicas of one expert on different ranks
        ranks = _slot_ranks(p, e)
        assert len(ranks) == len(set(ranks))
    assert p.rank_loads(torch.ones(16)).tolist() == [4.0, 4.0, 4.0, 4.0]


def test_every_expert_placed_while_capacity_allows_and_failed_ranks_get_nothing():
    rng = random.Random(1)
    for _ in range(400):
        load, num_ranks, slots, active = _random_case(rng)
        p = rebalance_experts(torch.tensor(load), num_ranks, slots, active)
        live_slots = sum(active) * slots
        for r in range(num_ranks):
            if not active[r]:
                assert p.local_experts(r) == [-1] * slots, (load, num_ranks, slots, active)
        if live_slots >= len(load):
            assert p.unavailable_experts() == [], (load, num_ranks, slots, active)
            assert int(p.logcnt.sum()) == live_slots  # no live slot wasted
        else:
            # the heaviest experts are the ones placed
            placed = [e for e in range(len(load)) if p.logcnt[e] > 0]
            assert len(placed) == live_slots
            missing = p.unavailable_experts()
            if placed:
                assert min(load[e] for e in placed) >= max(load[e] for e in missing)


def test_capacity_short_reports_unavailable_experts():
    load = torch.arange(16, 0, -1, dtype=torch.float64)  # expert 0 heaviest
    p = rebalance_experts(load, 4, 6, active_ranks=torch.tensor([1, 0, 0, 1], dtype=torch.int32))
    assert p.unavailable_experts() == [12, 13, 14, 15]
    assert p.local_experts(1) == [-1] * 6
    assert p.local_experts(2) == [-1] * 6


def test_deterministic_for_same_inputs_of_any_type():
    rng = random.Random(2)
    for _ in range(100):
        load, num_ranks, slots, active = _random_case(rng)
        a = rebalance_experts(torch.tensor(load, dtype=torch.float32), num_ranks, slots, active)
        b = rebalance_experts(
            [float(torch.tensor(v, dtype=torch.float32)) for v in load],
            num_ranks,
            slots,
            torch.tensor(active, dtype=torch.int32),
        )
        c = rebalance_experts(torch.tensor(load, dtype=torch.float32), num_ranks, slots, active)
        assert a.same_as(b)
        assert a.same_as(c)
        assert torch.equal(a.log2phy, c.log2phy)
        assert torch.equal(a.logcnt, c.logcnt)


def test_integer_loads_give_the_same_placement_as_float_loads():
    load = torch.tensor([7, 0, 3, 3, 12, 1, 0, 9], dtype=torch.int32)
    a = rebalance_experts(load, 3, 4)
    b = rebalance_experts(load.to(torch.float64), 3, 4)
    assert a.same_as(b)


def test_replicate_experts_minimises_heaviest_replica():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 5)
        slots = rng.randint(n, n + 5)
        w = [float(rng.randint(0, 30)) for _ in range(n)]
        counts = replicate_experts(w, slots)
        assert sum(counts) == slots
        assert min(counts) >= 1
        got = max(x / c for x, c in zip(w, counts))
        best = min(
            max(x / c for x, c in zip(w, cs))
            for cs in itertools.product(range(1, slots + 1), repeat=n)
            if sum(cs) == slots
        )
        assert got == pytest.approx(best, abs=1e-12)


def test_replicate_experts_caps_replicas_at_rank_count_and_honours_min_replicas():
    assert replicate_experts([100.0, 1.0], 4, max_replicas=2) == [2, 2]
    assert replicate_experts([100.0, 1.0], 4) == [3, 1]
    assert replicate_experts([100.0, 1.0, 1.0], 6, min_replicas=2) == [2, 2, 2]
    assert replicate_experts([100.0, 1.0, 1.0], 5, min_replicas=2) == [
        3,
        1,
        1,
    ]  # 2 each does not fit
    assert replicate_experts([1.0, 5.0, 3.0], 2) == [0, 1, 1]


def test_balance_bound_on_skewed_loads():
    """The stated bound: max live-rank load <= mean live-rank load + heaviest replica load, with the
    heaviest replica load is the optimum of replicate_experts; both terms are lower bounds of the
    optimal placement's max load, so the result is within 2x of optimal."""
    rng = random.Random(4)
    checked = 0
    for _ in range(600):
        load, num_ranks, slots, active = _random_case(rng)
        live = sum(active)
        if live == 0 or live * slots < len(load) or sum(load) == 0:
            continue
        p = rebalance_experts(torch.tensor(load), num_ranks, slots, active)
        rank_loads = p.rank_loads(load)
        mean = sum(load) / live
        heaviest_replica = max(x / c for x, c in zip(load, p.logcnt.tolist()))
        optimal_replica = max(
            x / c for x, c in zip(load, replicate_experts(load, live * slots, max_replicas=live))
        )
        assert heaviest_replica == pytest.approx(optimal_replica, rel=1e-12)
        assert float(rank_loads.max()) <= mean + heaviest_replica + 1e-9 * mean
        checked += 1
    assert checked > 200


def _best_packing(items: list[float], num_ranks: int, slots: int, bound: float) -> float:
    """Smallest max load over packings of ``items`` into ``num_ranks`` x ``slots``, or ``bound``."""
    loads = [0.0] * num_ranks
    sizes = [0] * num_ranks
    best = bound

    def place(i: int) -> None:
        nonlocal best
        if max(loads) >= best:
            return
        if i == len(items):
            best = max(loads)
            return
        seen = set()
        for r in range(num_ranks):
            if sizes[r] < slots and (loads[r], sizes[r]) not in seen:
                seen.add((loads[r], sizes[r]))
                loads[r] += items[i]
                sizes[r] += 1
                place(i + 1)
                loads[r] -= items[i]
                sizes[r] -= 1

    place(0)
    return best


def _optimal_max_load(load: list[float], num_ranks: int, slots: int) -> float:
    """Exhaustive optimum over replica counts and packings (tiny instances only)."""

    def compositions(total: int, n: int):
        if n == 1:
            yield (total,)
            return
        for first in range(1, total - n + 2):
            for rest in compositions(total - first, n - 1):
                yield (first, *rest)

    best = float("inf")
    for counts in compositions(num_ranks * slots, len(load)):
        if max(x / c for x, c in zip(load, counts)) >= best:
            continue
        items = sorted((x / c for x, c in zip(load, counts) for _ in range(c)), reverse=True)
        best = _best_packing(items, num_ranks, slots, best)
    return best


def test_within_stated_factor_of_exhaustive_optimum_on_small_skewed_instances():
    """Measured worst ratio 1.30 over 400 such instances while developing; the test allows 1.35."""
    rng = random.Random(5)
    worst = 1.0
    for _ in range(40):
        num_ranks, slots = rng.randint(2, 3), rng.randint(2, 3)
        n = rng.randint(max(1, num_ranks * slots - 4), num_ranks * slots)
        load = [float(int(rng.paretovariate(0.7) * 10)) for _ in range(n)]
        if sum(load) == 0:
            continue
        ours = float(rebalance_experts(torch.tensor(load), num_ranks, slots).rank_loads(load).max())
        worst = max(worst, ours / _optimal_max_load(load, num_ranks, slots))
    assert worst <= 1.35


@pytest.mark.parametrize(
    ("num_experts", "num_ranks", "slots"), [(16, 4, 6), (64, 8, 10), (256, 32, 9)]
)
def test_realistic_sizes_close_to_lower_bound(num_experts, num_ranks, slots):
    """Zipf loads (alpha 0.6 / 1.0 / 1.5), 0-2 failed ranks: max rank load within 1.25x of
    max(mean, heaviest replica) (measured worst 1.18 while developing)."""
    rng = random.Random(num_experts)
    for i in range(6):
        alpha = [0.6, 1.0, 1.5][i % 3]
        load = [1000.0 * (j + 1) ** -alpha for j in range(num_experts)]
        rng.shuffle(load)
        active = [1] * num_ranks
        for r in rng.sample(range(num_ranks), i % 3):
            active[r] = 0
        live = sum(active)
        if live * slots < num_experts:
            continue
        p = rebalance_experts(torch.tensor(load), num_ranks, slots, active)
        lower = max(sum(load) / live, max(x / c for x, c in zip(load, p.logcnt.tolist())))
        assert float(p.rank_loads(load).max()) <= 1.25 * lower


def test_pack_replicas_fills_packs_exactly_and_avoids_same_expert_pairs():
    items = [(10.0, 0), (10.0, 0), (10.0, 0), (4.0, 1), (3.0, 2), (1.0, 3)]
    packs = pack_replicas(items, 3, 2)
    assert sorted(len(p) for p in packs) == [2, 2, 2]
    assert all(len({e for _, e in p}) == len(p) for p in packs)
    assert max(sum(w for w, _ in p) for p in packs) == 14.0
    with pytest.raises(ValueError, match="do not fit"):
        pack_replicas(items, 2, 2)


def test_hierarchical_keeps_groups_on_one_node_and_splits_groups_evenly():
    rng = random.Random(6)
    for _ in range(50):
        load = _skewed_load(rng, 32, rng.randint(0, 3))
        p = rebalance_experts(torch.tensor(load), 8, 6, num_groups=8, ranks_per_node=2)
        assert p.policy == "hierarchical"
        assert p.unavailable_experts() == []
        node_groups: dict[int, set[int]] = {}
        for g in range(8):
            nodes = {s // 6 // 2 for e in range(4 * g, 4 * g + 4) for s in p.replica_slots(e)}
            assert len(nodes) == 1  # a group never spans nodes
            node_groups.setdefault(nodes.pop(), set()).add(g)
        assert sorted(len(v) for v in node_groups.values()) == [2, 2, 2, 2]


def test_hierarchical_with_a_failed_rank_uses_per_node_capacity():
    load = torch.tensor([100.0, 50, 20, 10, 5, 5, 5, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    p = rebalance_experts(load, 4, 6, [1, 0, 1, 1], num_groups=4, ranks_per_node=2)
    assert p.policy == "hierarchical"
    assert p.local_experts(1) == [-1] * 6
    assert p.unavailable_experts() == []
    for g in range(4):
        nodes = {s // 12 for e in range(4 * g, 4 * g + 4) for s in p.replica_slots(e)}
        assert len(nodes) == 1


def test_hierarchical_falls_back_to_global_when_groups_do_not_fit():
    # groups of 8 experts; node 0 keeps one rank (6 slots), too small for any group
    p = rebalance_experts(torch.ones(16), 4, 6, [1, 0, 1, 1], num_groups=2, ranks_per_node=2)
    assert p.policy.startswith("global")
    assert p.unavailable_experts() == []


def test_available_mask_excludes_lost_experts():
    p = rebalance_experts(torch.ones(8), 2, 4, available=[True] * 6 + [False, False])
    assert p.unavailable_experts() == [6, 7]
    assert int(p.logcnt.sum()) == 8


def test_min_replicas_two_survives_any_single_rank_failure():
    rng = random.Random(7)
    load = _skewed_load(rng, 12, 0)
    p = rebalance_experts(torch.tensor(load), 4, 6, min_replicas=2)
    for dead in range(4):
        for e in range(12):
            assert any(r != dead for r in _slot_ranks(p, e))


def test_previous_placement_keeps_slots_and_reduces_moves():
    rng = random.Random(8)
    load = _skewed_load(rng, 16, 0)
    first = rebalance_experts(torch.tensor(load), 4, 6)
    again = rebalance_experts(torch.tensor(load), 4, 6, previous=first)
    assert again.same_as(first)
    active = [1, 1, 0, 1]
    with_prev = rebalance_experts(torch.tensor(load), 4, 6, active, previous=first)
    without = rebalance_experts(torch.tensor(load), 4, 6, active)
    # the previous placement only changes which rank gets which pack and the slot order
    assert torch.allclose(
        with_prev.rank_loads(load).sort().values, without.rank_loads(load).sort().values
    )
    kept_with = len(plan_weight_moves(first, with_prev, active).kept)
    kept_without = len(plan_weight_moves(first, without, active).kept)
    assert kept_with >= kept_without
    assert kept_with >= 6  # most of a rank's worth stays put


def test_logical_load_from_physical_sums_replicas():
    p = ExpertPlacement.from_phy2log([0, 1, 1, 2, -1, 0], 3, 2, 3)
    stats = torch.tensor([[5, 1, 2], [7, 9, 3]], dtype=torch.int32)
    assert logical_load_from_physical(stats, p).tolist() == [8.0, 3.0, 7.0]


def test_placement_maps_are_consistent():
    p = rebalance_experts(torch.tensor([5.0, 1, 1, 9, 0, 2]), 3, 3, [1, 1, 0])
    for e in range(p.num_logical):
        slots = p.replica_slots(e)
        assert len(slots) == int(p.logcnt[e])
        assert all(int(p.phy2log[s]) == e for s in slots)
        assert slots == sorted(slots)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"expert_load": torch.ones(2, 2), "num_ranks": 2, "slots_per_rank": 2}, ValueError, "1-D"),
        ({"expert_load": [1.0, -1.0], "num_ranks": 2, "slots_per_rank": 2}, ValueError, ">= 0"),
        (
            {"expert_load": [1.0, float("nan")], "num_ranks": 2, "slots_per_rank": 2},
            ValueError,
            "finite",
        ),
        ({"expert_load": [], "num_ranks": 2, "slots_per_rank": 2}, ValueError, "at least one"),
        ({"expert_load": [1.0], "num_ranks": 0, "slots_per_rank": 2}, ValueError, "num_ranks"),
        ({"expert_load": [1.0], "num_ranks": 2, "slots_per_rank": 0}, ValueError, "slots_per_rank"),
        (
            {"expert_load": [1.0], "num_ranks": 2, "slots_per_rank": 1, "active_ranks": [1]},
            ValueError,
            "active_ranks",
        ),
        (
            {"expert_load": [1.0], "num_ranks": 2, "slots_per_rank": 1, "active_ranks": [1, 2]},
            ValueError,
            "0 or 1",
        ),
        (
            {
                "expert_load": [1.0] * 4,
                "num_ranks": 2,
                "slots_per_rank": 2,
                "num_groups": 3,
                "ranks_per_node": 1,
            },
            ValueError,
            "num_groups",
        ),
        (
            {"expert_load": [1.0] * 4, "num_ranks": 2, "slots_per_rank": 2, "num_groups": 2},
            ValueError,
            "go together",
        ),
        (
            {
                "expert_load": [1.0] * 4,
                "num_ranks": 3,
                "slots_per_rank": 2,
                "num_groups": 2,
                "ranks_per_node": 2,
            },
            ValueError,
            "ranks_per_node",
        ),
        (
            {"expert_load": [1.0], "num_ranks": 2, "slots_per_rank": 1, "min_replicas": 0},
            ValueError,
            "min_replicas",
        ),
        (
            {"expert_load": [1.0], "num_ranks": 2, "slots_per_rank": 1, "available": [True, False]},
            ValueError,
            "available",
        ),
        (
            {"expert_load": [1.0], "num_ranks": 2, "slots_per_rank": 1, "previous": "x"},
            TypeError,
            "previous",
        ),
        (
            {"expert_load": "ab", "num_ranks": 2, "slots_per_rank": 1},
            ValueError,
            "could not convert|expert_load",
        ),
        ({"expert_load": 3, "num_ranks": 2, "slots_per_rank": 1}, TypeError, "expert_load"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rebalance_experts(**kwargs)


def test_previous_with_other_shape_is_rejected():
    prev = rebalance_experts(torch.ones(4), 2, 2)
    with pytest.raises(ValueError, match="previous placement"):
        rebalance_experts(torch.ones(4), 2, 3, previous=prev)


def test_from_phy2log_validates():
    with pytest.raises(ValueError, match="entries"):
        ExpertPlacement.from_phy2log([0, 1, 2], 3, 2, 2)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        ExpertPlacement.from_phy2log([0, 1, 2, 3], 3, 2, 2)
