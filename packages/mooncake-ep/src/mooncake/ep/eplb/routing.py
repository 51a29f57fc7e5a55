"""Map a router's logical expert choices to physical slots, choosing among live replicas.

The choice is a function of (token id, k, logical expert) and the list of live replicas only, so
it is deterministic per token and needs no communication; a multiplicative hash spreads tokens
evenly over the replicas. Replicas on failed ranks are never chosen; a (token, k) whose logical
expert has no live replica gets ``-1`` (``Buffer.dispatch`` skips it) and is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mooncake.ep.eplb.placement import ExpertPlacement

# Odd multipliers below 2**31: products with 31-bit token ids stay inside int64.
_TOKEN_MUL = 0x5BD1E995
_K_MUL = 0x27D4EB2F
_EXPERT_MUL = 0x165667B1


@dataclass(frozen=True)
class PhysicalRouting:
    """Result of :func:`route_to_physical`.

    Attributes:
        topk_idx: int64 ``[N, K]`` physical slot ids for ``Buffer.dispatch`` (``num_experts = P``);
            ``-1`` where the router said ``-1`` or the logical expert has no live replica.
        lost: bool ``[N, K]``; True where the router chose an expert that has no live replica.
        unavailable_experts: ascending logical experts that were chosen but had no live replica.
    """

    topk_idx: torch.Tensor
    lost: torch.Tensor
    unavailable_experts: list[int]

    @property
    def lost_tokens(self) -> torch.Tensor:
        """bool ``[N]``: tokens that lost at least one of their experts."""
        return self.lost.any(dim=1)


def route_to_physical(
    topk_idx: torch.Tensor,
    placement: ExpertPlacement,
    active_ranks: torch.Tensor | Sequence[int] | None = None,
    token_ids: torch.Tensor | None = None,
    token_offset: int = 0,
) -> PhysicalRouting:
    """Translate logical ``topk_idx`` to physical slot ids.

    Args:
        topk_idx: int64 ``[N, K]`` logical experts in ``[0, E)``, ``-1`` = none (any device).
        placement: the current :class:`ExpertPlacement`.
        active_ranks: int ``[R]`` (1 alive, 0 failed); replicas on failed ranks are skipped.
            None = trust the placement (it already has no slots on failed ranks).
        token_ids: int64 ``[N]`` ids that make the replica choice per token (default
            ``token_offset + arange(N)``). Use ids unique across ranks, e.g.
            ``rank * num_max_dispatch_tokens_per_rank + n``, so ranks spread over replicas.
        token_offset: see ``token_ids``.

    Returns:
        :class:`PhysicalRouting` on the device of ``topk_idx``.
    """
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
        raise ValueError(
            f"topk_idx must be a 2-D [N, K] tensor, got {getattr(topk_idx, 'shape', topk_idx)!r}"
        )
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx must be int64, got {topk_idx.dtype}")
    device = topk_idx.device
    num_tokens, k = topk_idx.shape
    num_logical = placement.num_logical
    if num_tokens and (int(topk_idx.max()) >= num_logical or int(topk_idx.min()) < -1):
        raise ValueError(
            f"topk_idx values must be in [-1, {num_logical}), got "
            f"[{int(topk_idx.min())}, {int(topk_idx.max())}]"
        )
    if token_ids is None:
        token_ids = torch.arange(num_tokens, dtype=torch.int64, device=device) + int(token_offset)
    elif token_ids.shape != (num_tokens,):
        raise ValueError(f"token_ids must have shape [{num_tokens}], got {tuple(token_ids.shape)}")

    log2phy = placement.log2phy.to(device)
    live = log2phy >= 0
    if active_ranks is not None:
        alive = torch.as_tensor(active_ranks, device=device).reshape(-1).to(torch.bool)
        if alive.numel() != placement.num_ranks:
            raise ValueError(
                f"active_ranks has {alive.numel()} entries, expected {placement.num_ranks}"
            )
        live &= alive[log2phy.clamp(min=0) // placement.slots_per_rank]
    width = log2phy.shape[1]
    # Live replicas first, in ascending slot order (keys are unique, so any sort is stable here).
    column = torch.arange(width, device=device).expand_as(log2phy)
    order = torch.argsort(torch.where(live, column, column + width), dim=1)
    live_slots = log2phy.gather(1, order)
    live_count = live.sum(dim=1)

    chosen = topk_idx >= 0
    expert = topk_idx.clamp(min=0)
    count = live_count[expert]
    ids = (token_ids.to(device=device, dtype=torch.int64) & 0x7FFFFFFF).unsqueeze(1)
    ks = torch.arange(k, dtype=torch.int64, device=device).unsqueeze(0)
    mixed = ids * _TOKEN_MUL + ks * _K_MUL + expert * _EXPERT_MUL
    pick = ((mixed >> 16) & 0x7FFFFFFF) % count.clamp(min=1)
    physical = live_slots[expert, pick]
    ok = chosen & (count > 0)
    lost = chosen & (count == 0)
    unavailable = sorted(set(topk_idx[lost].tolist())) if bool(lost.any()) else []
    return PhysicalRouting(
        topk_idx=torch.where(ok, physical, torch.full_like(physical, -1)),
        lost=lost,
        unavailable_experts=[int(e) for e in unavailable],
    )
