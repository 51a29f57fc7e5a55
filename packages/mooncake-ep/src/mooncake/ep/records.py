"""Wire format of the portable path: how rows are packed into and unpacked from byte tensors.

Pure tensor functions (no communication), used by ``portable_path`` around its collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .fp8 import num_scale_groups, pack_ue8m0, per_token_cast_to_fp8
from .routing_plan import CombineRecvPlan, DispatchRecvPlan, DispatchSendPlan, plan_dispatch_recv


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class RecordFormat:
    """Byte layout of one dispatch record (a row of a uint8 ``[M, record_bytes]`` tensor).

    ``[data | token int32 | experts int16/int32 x K (padded to 4 B) | scales | pad to 8 B]``.
    ``data`` is FP8 ``[H]`` or BF16 ``[H]``; ``scales`` float32 ``[H/128]``, or with UE8M0 the
    ``H/128`` exponent bytes, or nothing for BF16. Every field is aligned for a dtype view.
    """

    hidden: int
    topk: int
    use_fp8: bool
    use_ue8m0: bool
    expert_itemsize: int

    @staticmethod
    def make(
        hidden: int, topk: int, num_local_experts: int, use_fp8: bool, use_ue8m0: bool
    ) -> RecordFormat:
        itemsize = 2 if num_local_experts <= torch.iinfo(torch.int16).max else 4
        return RecordFormat(hidden, topk, use_fp8, use_fp8 and use_ue8m0, itemsize)

    @property
    def expert_dtype(self) -> torch.dtype:
        return torch.int16 if self.expert_itemsize == 2 else torch.int32

    @property
    def data_bytes(self) -> int:
        return self.hidden if self.use_fp8 else 2 * self.hidden

    @property
    def token_offset(self) -> int:
        return self.data_bytes

    @property
    def experts_offset(self) -> int:
        return self.token_offset + 4

    @property
    def scales_offset(self) -> int:
        return self.experts_offset + _align(self.topk * self.expert_itemsize, 4)

    @property
    def scales_bytes(self) -> int:
        if not self.use_fp8:
            return 0
        groups = num_scale_groups(self.hidden)
        return groups if self.use_ue8m0 else 4 * groups

    @property
    def record_bytes(self) -> int:
        return _align(self.scales_offset + self.scales_bytes, 8)

    @property
    def payload_bytes(self) -> int:
        """Routed bytes of one record: the token's data and scales."""
        return self.data_bytes + self.scales_bytes

    @property
    def meta_bytes(self) -> int:
        """Per-record metadata (token index, expert list, alignment padding)."""
        return self.record_bytes - self.payload_bytes


def pack_dispatch_records(
    x: torch.Tensor, fmt: RecordFormat, round_scale: bool, plan: DispatchSendPlan
) -> torch.Tensor:
    """uint8 ``[M, record_bytes]``: one record per (destination, token), destinations in order."""
    num_tokens = x.shape[0]
    per_token = torch.zeros((num_tokens, fmt.record_bytes), dtype=torch.uint8, device=x.device)
    if fmt.use_fp8:
        fp8_data, scales = per_token_cast_to_fp8(x, round_scale, fmt.use_ue8m0)
        per_token[:, : fmt.data_bytes] = fp8_data.view(torch.uint8)
        scale_cols = per_token[:, fmt.scales_offset : fmt.scales_offset + fmt.scales_bytes]
        if fmt.use_ue8m0:
            scale_cols.copy_(scales)
        else:
            scale_cols.view(torch.float32).copy_(scales)
    else:
        per_token[:, : fmt.data_bytes] = x.view(torch.uint8)
    token_col = per_token[:, fmt.token_offset : fmt.token_offset + 4].view(torch.int32)
    token_col.copy_(torch.arange(num_tokens, dtype=torch.int32, device=x.device).unsqueeze(1))
    rec_token = plan.rec_token.to(x.device)
    send = per_token.view(torch.int64).index_select(0, rec_token).view(torch.uint8)
    expert_cols = send[:, fmt.experts_offset : fmt.experts_offset + fmt.topk * fmt.expert_itemsize]
    expert_cols.view(fmt.expert_dtype).copy_(plan.rec_experts.to(x.device))
    return send


def unpack_dispatch_records(
    received: torch.Tensor,
    rows_in: list[int],
    usable: torch.Tensor,
    fmt: RecordFormat,
    data: torch.Tensor,
    scales: Optional[torch.Tensor],
    tokens: int,
    num_local: int,
    num_ranks: int,
) -> DispatchRecvPlan:
    """Write received rows into ``data`` (and ``scales``, the ``[L, G, R*T]`` allocation); returns
    the plan (counts, layout) for the caller to fill the handle."""
    rec_src = torch.repeat_interleave(
        torch.arange(num_ranks, device="cpu"),
        torch.tensor(rows_in, dtype=torch.int64, device="cpu"),
    )
    keep = usable[rec_src].nonzero().squeeze(1)
    meta = received.cpu() if received.device.type != "cpu" else received
    rec_token = (
        meta[:, fmt.token_offset : fmt.token_offset + 4].view(torch.int32)[:, 0].to(torch.int64)
    )
    rec_experts = meta[:, fmt.experts_offset : fmt.experts_offset + fmt.topk * fmt.expert_itemsize]
    rec_experts = rec_experts.view(fmt.expert_dtype)
    rp = plan_dispatch_recv(
        rec_src[keep], rec_token[keep], rec_experts[keep], num_local, num_ranks, tokens
    )
    if rp.row.numel() == 0:
        return rp
    device = data.device
    source_records = keep[rp.record].to(received.device)
    words = fmt.data_bytes // 8
    rows_data = received.view(torch.int64)[:, :words].index_select(0, source_records).to(device)
    flat = (rp.local_expert * (num_ranks * tokens) + rp.row).to(device)
    data.view(torch.uint8).view(-1, fmt.data_bytes).view(torch.int64).index_copy_(
        0, flat, rows_data
    )
    if scales is None:
        return rp
    cols = received[:, fmt.scales_offset : fmt.scales_offset + fmt.scales_bytes]
    expert, row = rp.local_expert.to(device), rp.row.to(device)
    if fmt.use_ue8m0:
        packed = pack_ue8m0(cols.index_select(0, source_records)).to(device)
        scales.transpose(1, 2)[expert, row] = packed
    else:
        values = cols.view(torch.float32).index_select(0, source_records).to(device)
        scales.transpose(1, 2)[expert, row] = values
    return rp


def gather_combine_rows(source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """uint8 ``[P, 2H]``: the rows ``rows`` (int64 indices into the flattened ``[L*R*T]``) of bf16
    ``source`` ``[L, R*T, H]``."""
    hidden = source.shape[-1]
    flat = source.view(-1, hidden).view(torch.int64)
    return flat.index_select(0, rows.to(source.device)).view(torch.uint8)


def reduce_combine_rows(
    received: torch.Tensor,
    rows_in: list[int],
    usable: torch.Tensor,
    plan: CombineRecvPlan,
    weights: torch.Tensor,
    combined: torch.Tensor,
    topk: int,
    hidden: int,
) -> None:
    """``combined[n] = sum_k w[n,k] * row(n,k)`` in fp32, k increasing; unusable owners: nothing."""
    device = combined.device
    num_tokens = combined.shape[0]
    rows_in_t = torch.tensor(rows_in, dtype=torch.int64, device="cpu")
    first_in = rows_in_t.cumsum(0) - rows_in_t
    expected = plan.expected_per_dest
    first_expected = expected.cumsum(0) - expected
    pair_index = torch.arange(plan.token.numel(), dtype=torch.int64, device=plan.token.device)
    keep = usable[plan.dest]
    row_of_pair = (first_in[plan.dest] + pair_index - first_expected[plan.dest])[keep]
    position = torch.full((num_tokens, topk), -1, dtype=torch.int64, device=plan.token.device)
    position[plan.token[keep], plan.slot[keep]] = row_of_pair
    rows = received.view(torch.bfloat16).view(-1, hidden)
    w = weights.to(rows.device)
    # Blocks of tokens keep the fp32 accumulator and temporaries in cache (about 2x faster than
    # whole-tensor passes at H=7168); the order of additions per element is still k = 0, 1, ...
    block = max(8, min(64, (1 << 20) // (4 * hidden)))
    for start in range(0, num_tokens, block):
        stop = min(start + block, num_tokens)
        pos = position[start:stop]
        num_valid = (pos >= 0).sum(dim=0).tolist()  # decided on the host: no device sync on CUDA
        acc = torch.zeros((stop - start, hidden), dtype=torch.float32, device=rows.device)
        for k in range(topk):
            if num_valid[k] == 0:
                continue
            if num_valid[k] == stop - start:  # common case: dense, no scatter
                gathered = rows.index_select(0, pos[:, k].to(rows.device)).float()
                acc += gathered.mul_(w[start:stop, k : k + 1])
                continue
            sub = (pos[:, k] >= 0).nonzero().squeeze(1)
            gathered = rows.index_select(0, pos[sub, k].to(rows.device)).float()
            sub = sub.to(rows.device)
            # one addition per row (tokens are unique within a slot), so this is exact and ordered
            acc.index_add_(0, sub, gathered.mul_(w[start + sub, k].unsqueeze(1)))
        combined[start:stop].copy_(acc.to(device=device, dtype=torch.bfloat16))
