"""The portable path's wire format and index plans, with the all-to-all simulated in process.

Fast (no processes), so it covers many world sizes, including ones the spawned tests skip, and
failure masks: a dead source's records are dropped, a dead owner contributes nothing.
"""

from __future__ import annotations

import pytest
import torch

from mooncake.ep.fp8 import num_scale_groups, num_ue8m0_ints
from mooncake.ep.records import (
    RecordFormat,
    gather_combine_rows,
    pack_dispatch_records,
    reduce_combine_rows,
    unpack_dispatch_records,
)
from mooncake.ep.reference import expert_view_of_tokens, reference_combine, reference_dispatch
from mooncake.ep.routing_plan import plan_combine_recv, plan_combine_send, plan_dispatch_send


def loopback(num_ranks, T, H, L, K, use_fp8, round_scale, ue8m0, alive, seed=0):
    E = num_ranks * L
    gen = torch.Generator().manual_seed(seed)
    xs, topks, weights = [], [], []
    for _ in range(num_ranks):
        n = int(torch.randint(0, T + 1, (1,), generator=gen))
        xs.append((torch.randn((n, H), generator=gen) * 0.2).to(torch.bfloat16))
        topk = torch.topk(torch.rand((n, E), generator=gen), K).indices
        if n:
            topk[0, 0] = -1
        topks.append(topk)
        weights.append(torch.rand((n, K), generator=gen))
    alive_t = torch.tensor(alive)
    fmt = RecordFormat.make(H, K, L, use_fp8, ue8m0)
    sends = []
    for r in range(num_ranks):
        plan = plan_dispatch_send(topks[r], L, num_ranks, alive_t, fmt.expert_dtype)
        records = pack_dispatch_records(xs[r], fmt, round_scale, plan)
        sends.append(list(torch.split(records, plan.records_per_dest.tolist())))
    outputs = []
    for r in range(num_ranks):
        if not alive[r]:
            outputs.append(None)
            continue
        chunks = [sends[s][r] if alive[s] else sends[s][r][:0] for s in range(num_ranks)]
        rows_in = [c.shape[0] for c in chunks]
        received = torch.cat(chunks)
        data = torch.empty(
            (L, num_ranks * T, H), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        )
        width = num_ue8m0_ints(H) if ue8m0 else num_scale_groups(H)
        scales = (
            torch.empty((L, width, num_ranks * T), dtype=torch.int32 if ue8m0 else torch.float32)
            if use_fp8
            else None
        )
        plan = unpack_dispatch_records(
            received, rows_in, alive_t.clone(), fmt, data, scales, T, L, num_ranks
        )
        recv_x = (data, scales.transpose(1, 2)) if use_fp8 else data
        outputs.append((recv_x, plan))
    return xs, topks, weights, outputs, alive_t, E


@pytest.mark.parametrize("num_ranks", [1, 2, 5, 7])
@pytest.mark.parametrize("mode", ["bf16", "fp8", "round", "ue8m0"])
def test_dispatch_and_combine_loopback(num_ranks: int, mode: str) -> None:
    use_fp8, round_scale, ue8m0 = mode != "bf16", mode in ("round", "ue8m0"), mode == "ue8m0"
    alive = [True] * num_ranks
    if num_ranks > 2:
        alive[1] = False  # a failed rank: sends nothing, receives nothing
    T, H, L, K = 9, 640, 3, min(4, 3 * num_ranks)
    xs, topks, weights, outputs, alive_t, E = loopback(
        num_ranks, T, H, L, K, use_fp8, round_scale, ue8m0, alive, seed=num_ranks
    )
    for r in range(num_ranks):
        if not alive[r]:
            continue
        recv_x, plan = outputs[r]
        expected = reference_dispatch(xs, topks, r, E, alive, use_fp8, round_scale, ue8m0)
        data = recv_x[0] if use_fp8 else recv_x
        for local, exp in enumerate(expected):
            count = int(plan.recv_count[local])
            assert count == exp.tokens.numel()
            assert torch.equal(plan.layout_range[local] & 0xFFFFFFFF, exp.per_source)
            rows = plan.row[plan.local_expert == local]
            assert torch.equal(rows, torch.arange(count))
            assert torch.equal(plan.token[plan.local_expert == local], exp.tokens)
            assert torch.equal(data[local, :count].view(torch.uint8), exp.data.view(torch.uint8))
            if use_fp8:
                assert torch.equal(recv_x[1][local, :count], exp.scales)
    # combine: owners send rows back (identity experts), sources reduce.
    combine_sends = {}
    for d in range(num_ranks):
        if not alive[d]:
            continue
        recv_x, plan = outputs[d]
        values = recv_x.clone() if not use_fp8 else None
        if use_fp8:
            from mooncake.ep.fp8 import per_token_cast_back

            values = per_token_cast_back(recv_x[0], recv_x[1])
        send_plan = plan_combine_send(plan.layout_range, alive_t, num_ranks, T)
        combine_sends[d] = list(
            torch.split(
                gather_combine_rows(values, send_plan.rows), send_plan.rows_per_dest.tolist()
            )
        )
    for s in range(num_ranks):
        if not alive[s]:
            continue
        chunks = [
            combine_sends[d][s] if alive[d] else combine_sends[s][s][:0] for d in range(num_ranks)
        ]
        received = torch.cat(chunks)
        plan = plan_combine_recv(topks[s], L, num_ranks, alive_t)
        combined = torch.empty_like(xs[s])
        reduce_combine_rows(
            received,
            [c.shape[0] for c in chunks],
            alive_t.clone(),
            plan,
            weights[s],
            combined,
            K,
            H,
        )
        seen = expert_view_of_tokens(xs[s], use_fp8, round_scale, ue8m0)
        want = reference_combine(seen, topks[s], weights[s], L, alive)
        assert torch.equal(combined, want)


def test_records_send_token_once_per_destination() -> None:
    topk = torch.tensor(
        [[0, 1, 4], [5, -1, 2], [3, 4, 5]]
    )  # L=3, R=2: experts 0-2 on rank 0, 3-5 on 1
    plan = plan_dispatch_send(topk, 3, 2, torch.tensor([True, True]), torch.int16)
    assert plan.rec_dest.tolist() == [0, 0, 1, 1, 1]
    assert plan.rec_token.tolist() == [0, 1, 0, 1, 2]
    assert plan.records_per_dest.tolist() == [2, 3]
    assert plan.pairs_per_dest.tolist() == [3, 5]
    lists = [[e for e in row if e >= 0] for row in plan.rec_experts.tolist()]
    assert lists == [[0, 1], [2], [1], [2], [0, 1, 2]]


def test_dead_destination_gets_nothing() -> None:
    topk = torch.tensor([[0, 3], [4, 5]])
    plan = plan_dispatch_send(topk, 3, 2, torch.tensor([True, False]), torch.int16)
    assert plan.records_per_dest.tolist() == [1, 0]
    assert plan.rec_token.tolist() == [0]
