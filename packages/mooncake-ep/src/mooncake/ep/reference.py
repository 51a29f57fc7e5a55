"""Plain-torch references: what dispatch/combine must produce, and a gather-everything baseline.

- ``reference_dispatch`` / ``reference_combine``: the contract's results computed directly (loops
  over experts and sources, no wire format), from every rank's inputs. Tests regenerate every rank's
  inputs from seeds, so no communication is needed to check a rank's results.
- ``GatherEverythingEP``: the naive distributed implementation (every rank all-gathers every rank's
  tokens and routing, then selects its own). The bench times the portable path against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .fp8 import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8


@dataclass
class ExpertRows:
    """What one local expert must receive, in the contract's order (by source, then token).

    ``sources``/``tokens`` int64 ``[count]``; ``values`` bf16 ``[count, H]`` (dequantized for FP8);
    ``data`` the raw rows as sent (FP8 or BF16) and ``scales`` (float32 ``[count, H/128]`` or packed
    int32 ``[count, ceil(H/512)]``, None for BF16); ``per_source`` int64 ``[R]``.
    """

    sources: torch.Tensor
    tokens: torch.Tensor
    values: torch.Tensor
    data: torch.Tensor
    scales: Optional[torch.Tensor]
    per_source: torch.Tensor


def cast_tokens(
    x: torch.Tensor, use_fp8: bool, round_scale: bool, use_ue8m0: bool
) -> tuple[torch.Tensor, Any]:
    """(data, scales) as the sender transmits them; scales packed int32 for UE8M0, None for BF16."""
    if not use_fp8:
        return x, None
    data, scales = per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    return data, pack_ue8m0(scales) if use_ue8m0 else scales


def expert_view_of_tokens(
    x: torch.Tensor, use_fp8: bool, round_scale: bool, use_ue8m0: bool
) -> torch.Tensor:
    """bf16 ``[N, H]``: each token as an expert sees it after dispatch (dequantized for FP8)."""
    data, scales = cast_tokens(x, use_fp8, round_scale, use_ue8m0)
    return per_token_cast_back(data, scales) if use_fp8 else x.clone()


def reference_dispatch(
    xs: Sequence[torch.Tensor],
    topks: Sequence[torch.Tensor],
    rank: int,
    num_experts: int,
    alive: Sequence[bool],
    use_fp8: bool = False,
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> list[ExpertRows]:
    """Rows each local expert of ``rank`` must receive from the ``alive`` sources (CPU tensors)."""
    num_ranks = len(xs)
    num_local = num_experts // num_ranks
    casts = [cast_tokens(x, use_fp8, round_scale, use_ue8m0) for x in xs]
    views = [expert_view_of_tokens(x, use_fp8, round_scale, use_ue8m0) for x in xs]
    result = []
    for local in range(num_local):
        expert = rank * num_local + local
        sources, tokens, per_source = [], [], []
        for src in range(num_ranks):
            hits = (
                (topks[src] == expert).any(dim=1).nonzero().squeeze(1)
                if alive[src]
                else torch.zeros(0, dtype=torch.int64, device=topks[src].device)
            )
            sources.append(torch.full_like(hits, src))
            tokens.append(hits)
            per_source.append(hits.numel())
        src_t, tok_t = torch.cat(sources), torch.cat(tokens)
        hidden = xs[0].shape[1]
        values = (
            torch.stack([views[s][t] for s, t in zip(src_t.tolist(), tok_t.tolist())])
            if tok_t.numel()
            else torch.zeros(0, hidden, dtype=torch.bfloat16, device=xs[0].device)
        )
        data_rows = [casts[s][0][t] for s, t in zip(src_t.tolist(), tok_t.tolist())]
        scale_rows = (
            [casts[s][1][t] for s, t in zip(src_t.tolist(), tok_t.tolist())] if use_fp8 else []
        )
        data = torch.stack(data_rows) if data_rows else casts[0][0][:0]
        scales = (torch.stack(scale_rows) if scale_rows else casts[0][1][:0]) if use_fp8 else None
        result.append(
            ExpertRows(
                src_t,
                tok_t,
                values,
                data,
                scales,
                torch.tensor(per_source, dtype=torch.int64, device=src_t.device),
            )
        )
    return result


def reference_combine(
    expert_rows: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_local_experts: int,
    owner_alive: Sequence[bool],
    expert_fn: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """``sum_k w[n,k] * f_e(row_n)`` in fp32, k increasing, skipping -1 and dead owners; bf16
    ``[N, H]``.

    ``expert_rows`` bf16 ``[N, H]``: each token as the experts saw it; ``expert_fn(e, rows)`` the
    expert
    (identity when None), applied to bf16 rows exactly as the test applies it on the owner.
    """
    num_tokens, hidden = expert_rows.shape
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=expert_rows.device)
    for k in range(topk_idx.shape[1]):
        for n in range(num_tokens):
            expert = int(topk_idx[n, k])
            if expert < 0 or not owner_alive[expert // num_local_experts]:
                continue
            row = expert_rows[n : n + 1]
            out = expert_fn(expert, row) if expert_fn is not None else row
            acc[n : n + 1] += out.float() * topk_weights[n, k]
    return acc.to(torch.bfloat16)


def _all_gather_single(output: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(
        output, inp, group=group
    )


class GatherEverythingEP:
    """The naive baseline: all-gather every rank's tokens and routing, select locally.

    dispatch: ``all_gather`` of x (bf16 ``[T, H]``, padded) and of ``topk_idx`` (``[T, K]``), then
    each rank picks and lays out (and casts, for FP8) the rows of its experts. combine: every rank
    computes the weighted contributions of its experts for every token of every rank (fp32 ``[R*T,
    H]``) and ``all_reduce``s them; each rank keeps its slice. Same outputs as ``Buffer`` (no fault
    tolerance).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = group.rank()
        self.num_ranks = group.size()
        self.wire_bytes = (
            0  # bytes this rank handed to collectives (inputs, once per peer for gathers)
        )

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        tokens: int,
        num_experts: int,
        use_fp8: bool = True,
    ) -> tuple[Any, torch.Tensor, tuple]:
        num_ranks, rank = self.num_ranks, self.rank
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        num_local = num_experts // num_ranks
        padded_x = torch.zeros((tokens, hidden), dtype=torch.bfloat16, device=x.device)
        padded_x[:num_tokens] = x
        padded_topk = torch.full((tokens, topk), -1, dtype=torch.int64, device=x.device)
        padded_topk[:num_tokens] = topk_idx
        all_x = torch.empty((num_ranks * tokens, hidden), dtype=torch.bfloat16, device=x.device)
        all_topk = torch.empty((num_ranks * tokens, topk), dtype=torch.int64, device=x.device)
        _all_gather_single(all_x.view(torch.uint8), padded_x.view(torch.uint8), group=self.group)
        _all_gather_single(all_topk, padded_topk, group=self.group)
        self.wire_bytes += (num_ranks - 1) * (padded_x.numel() * 2 + padded_topk.numel() * 8)
        local = all_topk - rank * num_local
        hit = (local >= 0) & (local < num_local)
        flat_token, slot = hit.nonzero(as_tuple=True)  # ordered by (source, token)
        expert = local[flat_token, slot]
        order = torch.argsort(expert, stable=True)
        expert, flat_token = expert[order], flat_token[order]
        counts = torch.bincount(
            expert * num_ranks + flat_token // tokens, minlength=num_local * num_ranks
        )
        counts = counts.view(num_local, num_ranks)
        recv_count = counts.sum(1)
        row = (
            torch.arange(expert.numel(), device=x.device)
            - (recv_count.cumsum(0) - recv_count)[expert]
        )
        rows = num_ranks * tokens
        dest = expert * rows + row
        src_info = torch.full((num_local, rows), -1, dtype=torch.int32, device=x.device)
        src_info.view(-1)[dest] = (flat_token % tokens).to(torch.int32)
        layout_range = ((counts.cumsum(1) - counts) << 32) | counts
        if use_fp8:
            # Cast each gathered token once (not once per selection), then pick rows.
            wanted = torch.unique(flat_token)
            cast_data, cast_scales = per_token_cast_to_fp8(all_x.index_select(0, wanted))
            slot = torch.searchsorted(wanted, flat_token)
            recv_data = torch.empty(
                (num_local, rows, hidden), dtype=torch.float8_e4m3fn, device=x.device
            )
            recv_data.view(torch.uint8).view(-1, hidden)[dest] = cast_data.view(torch.uint8)[slot]
            scale_alloc = torch.empty(
                (num_local, hidden // 128, rows), dtype=torch.float32, device=x.device
            )
            scale_alloc.transpose(1, 2)[expert, row] = cast_scales[slot]
            recv_x: Any = (recv_data, scale_alloc.transpose(1, 2))
        else:
            recv_x = torch.empty((num_local, rows, hidden), dtype=torch.bfloat16, device=x.device)
            recv_x.view(-1, hidden)[dest] = all_x.index_select(0, flat_token)
        self._last = (all_topk, tokens, num_experts)
        return (
            recv_x,
            recv_count.to(torch.int32),
            (src_info, layout_range, tokens, hidden, num_experts),
        )

    def combine(self, x: torch.Tensor, topk_weights: torch.Tensor, handle: tuple) -> torch.Tensor:
        """``x`` bf16 ``[L, R*T, H]`` expert outputs; routing as gathered by the last dispatch."""
        all_topk, tokens, num_experts = self._last
        num_ranks, rank = self.num_ranks, self.rank
        num_local = num_experts // num_ranks
        src_info, layout_range = handle[0], handle[1]
        hidden = x.shape[2]
        num_tokens, topk = topk_weights.shape
        padded_w = torch.zeros((tokens, topk), dtype=torch.float32, device=x.device)
        padded_w[:num_tokens] = topk_weights
        all_w = torch.empty((num_ranks * tokens, topk), dtype=torch.float32, device=x.device)
        _all_gather_single(all_w, padded_w, group=self.group)
        partial = torch.zeros((num_ranks * tokens, hidden), dtype=torch.float32, device=x.device)
        counts = layout_range & 0xFFFFFFFF  # [L, R]
        per_expert = counts.sum(dim=1)
        local = torch.repeat_interleave(torch.arange(num_local, device=x.device), per_expert)
        row = torch.arange(local.numel(), device=x.device) - torch.repeat_interleave(
            per_expert.cumsum(0) - per_expert, per_expert
        )
        source = torch.repeat_interleave(
            torch.arange(num_ranks, device=x.device).repeat(num_local), counts.reshape(-1)
        )
        flat_token = source * tokens + src_info[local, row].to(torch.int64)
        expert = (rank * num_local + local).unsqueeze(1)
        weight = (all_w[flat_token] * (all_topk[flat_token] == expert)).sum(dim=1, keepdim=True)
        partial.index_add_(0, flat_token, x[local, row].float() * weight)
        dist.all_reduce(partial, group=self.group)
        self.wire_bytes += (
            2 * (num_ranks - 1) * partial.numel() * 4 // num_ranks
            + (num_ranks - 1) * padded_w.numel() * 4
        )
        return partial[rank * tokens : rank * tokens + num_tokens].to(torch.bfloat16)
