"""The example MoE layer's pieces: row-exact expert compute, reference, config, one-rank forward."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist

from mooncake.ep.examples.moe_layer import (
    ExpertCheckpoint,
    FaultTolerantMoELayer,
    MoEConfig,
    ReferenceMoE,
    _row_exact_matmul,
    expert_mlp,
    reference_output,
    route_tokens,
)

pytestmark = pytest.mark.timeout(120)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_expert_rows_do_not_depend_on_the_batch(device):
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(3, 64, 128, generator=g) * 0.1).bfloat16().to(device)
    w2 = (torch.randn(3, 128, 32, generator=g) * 0.1).bfloat16().to(device)
    x = torch.randn(3, 150, 128, generator=g).bfloat16().to(device)
    full = expert_mlp(x, w13, w2, rows_per_chunk=64)
    for start, rows in [(0, 1), (5, 7), (10, 33), (60, 90), (149, 1)]:
        part = expert_mlp(x[:, start : start + rows], w13, w2, rows_per_chunk=16)
        assert torch.equal(part, full[:, start : start + rows]), (start, rows)
    # one slot alone gives the same rows as inside the stacked call
    assert torch.equal(expert_mlp(x[1:2], w13[1:2], w2[1:2]), full[1:2])
    assert expert_mlp(x[:, :0], w13, w2).shape == (3, 0, 128)


def test_row_exact_matmul_is_a_matmul():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 100, generator=g), torch.randn(7, 100, generator=g)
    torch.testing.assert_close(_row_exact_matmul(a, b), a @ b.t(), rtol=1e-5, atol=1e-5)


def test_reference_combines_in_increasing_k_with_fp32_accumulation():
    cfg = MoEConfig()
    ckpt = ExpertCheckpoint(cfg)
    x = torch.randn(9, cfg.hidden, generator=torch.Generator().manual_seed(2)).bfloat16()
    idx, w = route_tokens(x, ckpt.router(), cfg.top_k)
    assert idx.dtype == torch.int64
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(dim=1), torch.ones(9))
    outs = ReferenceMoE(ckpt).expert_outputs(x)
    want = torch.zeros(9, cfg.hidden)
    for n in range(9):
        for k in range(cfg.top_k):
            want[n] = want[n] + outs[idx[n, k], n].float() * w[n, k]
    assert torch.equal(reference_output(x, idx, w, ckpt), want.bfloat16())
    dropped = torch.zeros_like(idx, dtype=torch.bool)
    dropped[3, 1] = True
    without = reference_output(x, idx, w, ckpt, dropped=dropped)
    assert torch.equal(without[3], (outs[idx[3, 0], 3].float() * w[3, 0]).bfloat16())
    assert torch.equal(without[4], want[4].bfloat16())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": 100}, "multiple of 128"),
        ({"top_k": 17}, "top_k"),
        ({"slots_per_rank": 0}, "slots_per_rank"),
        ({"rebalance_every": -1}, "rebalance_every"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_layer_matches_reference_through_rebalances():
    """A one-rank gloo group in this process: the layer's output equals the reference every pass,
    while load-driven rebalances reorder slots (local copies) and reload experts (storage)."""
    buffer_mod = pytest.importorskip("mooncake.mooncake_ep_buffer")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        cfg = MoEConfig(slots_per_rank=20, rebalance_every=1, min_gain=0.0)
        ckpt = ExpertCheckpoint(cfg)
        group = dist.group.WORLD
        buffer = buffer_mod.Buffer(group, path="portable")
        layer = FaultTolerantMoELayer(cfg, group, buffer, ckpt)
        reference = ReferenceMoE(ckpt)
        plans = []
        for p in range(4):
            x = torch.randn(
                cfg.tokens_per_rank - p, cfg.hidden, generator=torch.Generator().manual_seed(p)
            )
            x = x.bfloat16()
            out, rep = layer.forward(x)
            assert rep.lost_tokens == 0
            assert rep.unavailable_experts == []
            want = reference.combine(reference.expert_outputs(x), rep.topk_idx, rep.topk_weights)
            assert torch.equal(out, want), p
            if rep.rebalance is not None:
                plans.append(rep.rebalance.plan)
        assert plans, "rebalance_every=1 must rebalance"
        buffer.destroy()
    finally:
        dist.destroy_process_group()
