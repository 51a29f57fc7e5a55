"""Index arithmetic of the portable path: who sends which rows where, and where they land.

Pure functions on CPU int64 tensors (no communication), so they are easy to test and to read.

Wire format of a dispatch (see ``records.RecordFormat``): one *record* per (token, destination
rank): the token's payload (FP8 data + scales, or BF16) is sent once even when the token selected
several experts on that rank, followed by its index on the source and the list of those local
experts. The receiver expands every record into one row per listed expert. Combine sends one BF16
row per (token, expert) back, because each expert's output differs.

Orders (both sides derive them independently, so combine needs no per-row metadata):
- records to one destination: by token index;
- rows of one local expert on the receiver: by source rank, then token index (the contract's
  "grouped by source"); ``layout_range[l, r] = (begin << 32) | count``;
- combine rows from owner ``d`` to source ``s``: by local expert, then token index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT32_MASK = (1 << 32) - 1


@dataclass
class DispatchSendPlan:
    """Records of one rank, sorted by (destination, token).

    ``rec_token`` int64 ``[M]``; ``rec_dest`` int64 ``[M]``; ``rec_experts`` ``[M, K]`` local expert
    ids (-1 padded); ``records_per_dest`` int64 ``[R]``; ``pairs_per_dest`` int64 ``[R]`` =
    selections.
    """

    rec_token: torch.Tensor
    rec_dest: torch.Tensor
    rec_experts: torch.Tensor
    records_per_dest: torch.Tensor
    pairs_per_dest: torch.Tensor


def plan_dispatch_send(
    topk_idx: torch.Tensor,
    num_local_experts: int,
    num_ranks: int,
    dest_alive: torch.Tensor,
    expert_dtype: torch.dtype,
) -> DispatchSendPlan:
    """Group this rank's selections into per-destination records. ``topk_idx`` CPU int64 ``[N, K]``
    (-1 = none); ``dest_alive`` bool ``[R]``: nothing is planned for a dead destination."""
    num_tokens, topk = topk_idx.shape
    valid = topk_idx >= 0
    expert = topk_idx.clamp_min(0)
    dest = expert // num_local_experts
    valid &= dest_alive[dest]
    token, slot = valid.nonzero(as_tuple=True)
    pair_dest = dest[token, slot]
    pair_local = expert[token, slot] % num_local_experts
    key = (pair_dest * num_tokens + token) * num_local_experts + pair_local
    order = torch.argsort(key, stable=True)
    pair_dest, token, pair_local = pair_dest[order], token[order], pair_local[order]
    record_key, inverse, per_record = torch.unique_consecutive(
        pair_dest * max(num_tokens, 1) + token, return_inverse=True, return_counts=True
    )
    first = per_record.cumsum(0) - per_record
    within = torch.arange(token.numel(), dtype=torch.int64, device=token.device) - first[inverse]
    rec_experts = torch.full(
        (record_key.numel(), topk), -1, dtype=expert_dtype, device=record_key.device
    )
    rec_experts[inverse, within] = pair_local.to(expert_dtype)
    rec_dest = record_key // max(num_tokens, 1)
    return DispatchSendPlan(
        rec_token=record_key % max(num_tokens, 1),
        rec_dest=rec_dest,
        rec_experts=rec_experts,
        records_per_dest=torch.bincount(rec_dest, minlength=num_ranks),
        pairs_per_dest=torch.bincount(pair_dest, minlength=num_ranks),
    )


@dataclass
class DispatchRecvPlan:
    """Where received records land. Per row (sorted by local expert, source, token):
    ``record`` (index into the received records), ``local_expert``, ``row`` (within the expert),
    ``token`` (index on the source). Per expert: ``layout_range`` int64 ``[L, R]``, ``recv_count``
    int64 ``[L]``."""

    record: torch.Tensor
    local_expert: torch.Tensor
    row: torch.Tensor
    token: torch.Tensor
    layout_range: torch.Tensor
    recv_count: torch.Tensor


class RoutingProtocolError(RuntimeError):
    """A peer sent records that break the wire format (a version or usage mismatch)."""


def plan_dispatch_recv(
    rec_src: torch.Tensor,
    rec_token: torch.Tensor,
    rec_experts: torch.Tensor,
    num_local_experts: int,
    num_ranks: int,
    tokens_per_rank: int,
) -> DispatchRecvPlan:
    """Expand received records (already in (source, token) order) into expert rows.

    ``rec_src``/``rec_token`` int64 ``[M]``, ``rec_experts`` ``[M, K]`` (-1 padded). Records of
    failed sources must already be removed.
    """
    record, column = (rec_experts >= 0).nonzero(as_tuple=True)
    local = rec_experts[record, column].to(torch.int64)
    if local.numel() and int(local.max()) >= num_local_experts:
        raise RoutingProtocolError(
            f"a record names local expert {int(local.max())} >= {num_local_experts}"
        )
    order = torch.argsort(local, stable=True)
    local, record = local[order], record[order]
    src, token = rec_src[record], rec_token[record]
    if token.numel() and int(token.max()) >= tokens_per_rank:
        raise RoutingProtocolError(
            f"a record names token {int(token.max())} >= T={tokens_per_rank}"
        )
    counts = torch.bincount(local * num_ranks + src, minlength=num_local_experts * num_ranks)
    counts = counts.view(num_local_experts, num_ranks)
    if counts.numel() and int(counts.max()) > tokens_per_rank:
        raise RoutingProtocolError(
            f"a source sent {int(counts.max())} rows to one expert, more than T={tokens_per_rank}"
        )
    recv_count = counts.sum(dim=1)
    expert_first = recv_count.cumsum(0) - recv_count
    row = torch.arange(local.numel(), dtype=torch.int64, device=local.device) - expert_first[local]
    begin = counts.cumsum(dim=1) - counts
    return DispatchRecvPlan(
        record=record,
        local_expert=local,
        row=row,
        token=token,
        layout_range=(begin << 32) | counts,
        recv_count=recv_count,
    )


@dataclass
class CombineSendPlan:
    """Rows of the expert-output tensor (flattened ``[L*R*T]``) to send, grouped by source rank."""

    rows: torch.Tensor
    rows_per_dest: torch.Tensor


def plan_combine_send(
    layout_range: torch.Tensor, src_alive: torch.Tensor, num_ranks: int, tokens_per_rank: int
) -> CombineSendPlan:
    """From the dispatch handle's ``layout_range`` (CPU int64 ``[L, R]``); none to dead sources."""
    num_local_experts = layout_range.shape[0]
    counts = (layout_range & INT32_MASK) * src_alive.to(torch.int64).unsqueeze(0)
    begins = layout_range >> 32
    base = (
        torch.arange(num_local_experts, dtype=torch.int64, device=layout_range.device).unsqueeze(1)
        * (num_ranks * tokens_per_rank)
        + begins
    )
    per_block = counts.t().reshape(-1)  # source-major, then local expert
    block_base = base.t().reshape(-1)
    total = int(per_block.sum())
    block_first = per_block.cumsum(0) - per_block
    offset = torch.arange(
        total, dtype=torch.int64, device=layout_range.device
    ) - torch.repeat_interleave(block_first, per_block)
    rows = torch.repeat_interleave(block_base, per_block) + offset
    return CombineSendPlan(rows=rows, rows_per_dest=counts.sum(dim=0))


@dataclass
class CombineRecvPlan:
    """This rank's (token, slot) selections in the order owners send their rows back:
    by owner, local expert, token. ``expected_per_dest`` int64 ``[R]``."""

    token: torch.Tensor
    slot: torch.Tensor
    dest: torch.Tensor
    expected_per_dest: torch.Tensor


def plan_combine_recv(
    topk_idx: torch.Tensor, num_local_experts: int, num_ranks: int, owner_alive: torch.Tensor
) -> CombineRecvPlan:
    num_tokens = topk_idx.shape[0]
    valid = topk_idx >= 0
    expert = topk_idx.clamp_min(0)
    dest = expert // num_local_experts
    valid &= owner_alive[dest]
    token, slot = valid.nonzero(as_tuple=True)
    pair_expert = expert[token, slot]  # owner-major, then local expert (global id order)
    order = torch.argsort(pair_expert * max(num_tokens, 1) + token, stable=True)
    token, slot = token[order], slot[order]
    pair_dest = pair_expert[order] // num_local_experts
    return CombineRecvPlan(
        token=token,
        slot=slot,
        dest=pair_dest,
        expected_per_dest=torch.bincount(pair_dest, minlength=num_ranks),
    )
