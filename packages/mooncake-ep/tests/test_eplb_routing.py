"""Routing of logical top-k choices to live physical replicas."""

from __future__ import annotations

import random

import pytest
import torch

from mooncake.ep.eplb import ExpertPlacement, rebalance_experts, route_to_physical

pytestmark = pytest.mark.timeout(60)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_never_targets_a_failed_rank_when_a_live_replica_exists(device):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        num_ranks, slots = rng.randint(2, 6), rng.randint(2, 6)
        num_experts = rng.randint(1, num_ranks * slots)
        placement = rebalance_experts(torch.rand(num_experts, generator=gen), num_ranks, slots)
        active = torch.tensor(
            [0 if rng.random() < 0.3 else 1 for _ in range(num_ranks)], dtype=torch.int32
        )
        topk = torch.randint(-1, num_experts, (64, 3), generator=gen)
        routed = route_to_physical(topk.to(device), placement, active.to(device))
        phys = routed.topk_idx.cpu()
        assert phys.device == torch.device("cpu")
        assert routed.topk_idx.device.type == device
        for n in range(64):
            for k in range(3):
                e = int(topk[n, k])
                live = (
                    [s for s in placement.replica_slots(e) if active[s // slots]] if e >= 0 else []
                )
                if e < 0:
                    assert phys[n, k] == -1
                    assert not routed.lost[n, k]
                elif live:
                    assert int(phys[n, k]) in live
                    assert not routed.lost[n, k]
                else:
                    assert phys[n, k] == -1
                    assert routed.lost[n, k]
                    assert e in routed.unavailable_experts
        lost_experts = sorted({int(topk[n, k]) for n, k in routed.lost.nonzero().tolist()})
        assert routed.unavailable_experts == lost_experts
        assert torch.equal(routed.lost_tokens.cpu(), routed.lost.cpu().any(dim=1))


def test_choice_is_deterministic_per_token_and_independent_of_the_batch():
    placement = rebalance_experts(torch.ones(8), 4, 4)  # every expert has 2 replicas
    topk = torch.randint(0, 8, (50, 4), generator=torch.Generator().manual_seed(1))
    ids = torch.arange(1000, 1050)
    whole = route_to_physical(topk, placement, token_ids=ids).topk_idx
    again = route_to_physical(topk, placement, token_ids=ids).topk_idx
    assert torch.equal(whole, again)
    for n in [0, 17, 49]:
        single = route_to_physical(topk[n : n + 1], placement, token_ids=ids[n : n + 1]).topk_idx
        assert torch.equal(single[0], whole[n])
    shifted = route_to_physical(topk, placement, token_offset=1000).topk_idx
    assert torch.equal(shifted, whole)


def test_replica_choice_is_balanced():
    # expert 0 has 3 replicas on 3 ranks; 6000 tokens pick it
    placement = ExpertPlacement.from_phy2log([0, 1, 0, 2, 0, 3], 4, 3, 2)
    topk = torch.zeros(6000, 1, dtype=torch.int64)
    phys = route_to_physical(topk, placement).topk_idx.reshape(-1)
    counts = torch.bincount(phys, minlength=6)
    assert counts[[1, 3, 5]].sum() == 0
    for slot in (0, 2, 4):
        assert abs(int(counts[slot]) - 2000) < 200, counts.tolist()
    # per k as well: token-major (n, k) pairs spread too
    topk = torch.zeros(3000, 2, dtype=torch.int64)
    phys = route_to_physical(topk, placement, token_offset=77).topk_idx
    for k in range(2):
        c = torch.bincount(phys[:, k], minlength=6)
        assert all(abs(int(c[s]) - 1000) < 150 for s in (0, 2, 4)), c.tolist()


def test_failed_rank_replica_traffic_moves_to_the_survivors_evenly():
    placement = ExpertPlacement.from_phy2log([0, 1, 0, 2, 0, 3], 4, 3, 2)
    topk = torch.zeros(4000, 1, dtype=torch.int64)
    phys = route_to_physical(topk, placement, active_ranks=[1, 0, 1]).topk_idx.reshape(-1)
    counts = torch.bincount(phys, minlength=6)
    assert counts[2] == 0
    assert abs(int(counts[0]) - 2000) < 200
    assert abs(int(counts[4]) - 2000) < 200


def test_unavailable_expert_reported_and_others_unaffected():
    placement = ExpertPlacement.from_phy2log(
        [0, 1, 2, 3, 0, 1], 4, 3, 2
    )  # expert 2, 3 only on rank 1
    topk = torch.tensor([[0, 2], [3, 1], [1, 0], [-1, 2]])
    routed = route_to_physical(
        topk, placement, active_ranks=torch.tensor([1, 0, 1], dtype=torch.int32)
    )
    assert routed.unavailable_experts == [2, 3]
    assert routed.lost.tolist() == [[False, True], [True, False], [False, False], [False, True]]
    assert routed.lost_tokens.tolist() == [True, True, False, True]
    assert (routed.topk_idx[~routed.lost & (topk >= 0)] // 2 != 1).all()


def test_empty_batch():
    placement = rebalance_experts(torch.ones(4), 2, 2)
    routed = route_to_physical(torch.empty(0, 2, dtype=torch.int64), placement)
    assert routed.topk_idx.shape == (0, 2)
    assert routed.unavailable_experts == []


@pytest.mark.parametrize(
    ("topk", "kwargs", "exc", "match"),
    [
        (torch.zeros(3, dtype=torch.int64), {}, ValueError, "2-D"),
        (torch.zeros(3, 2, dtype=torch.int32), {}, TypeError, "int64"),
        (torch.full((3, 2), 4, dtype=torch.int64), {}, ValueError, r"\[-1, 4\)"),
        (torch.full((3, 2), -2, dtype=torch.int64), {}, ValueError, r"\[-1, 4\)"),
        (torch.zeros(3, 2, dtype=torch.int64), {"active_ranks": [1]}, ValueError, "active_ranks"),
        (
            torch.zeros(3, 2, dtype=torch.int64),
            {"token_ids": torch.arange(2)},
            ValueError,
            "token_ids",
        ),
    ],
)
def test_bad_arguments(topk, kwargs, exc, match):
    placement = rebalance_experts(torch.ones(4), 2, 2)
    with pytest.raises(exc, match=match):
        route_to_physical(topk, placement, **kwargs)
