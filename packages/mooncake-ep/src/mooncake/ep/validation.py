"""The full argument checks of ``Buffer.dispatch`` / ``Buffer.combine`` (``mooncake.ep.buffer``).

``Buffer`` runs them on the first call with an argument signature and on any change of it; the
steady state skips them. Each raises ``TypeError`` / ``ValueError`` naming the argument, its value
and the limit (``mooncake.ep.limits``), before anything is sent.
"""

from __future__ import annotations

from typing import Any

import torch

from .limits import (
    Limit,
    check_bool,
    check_experts,
    check_hidden,
    check_tensor,
    check_timeout_us,
    check_tokens_per_rank,
    check_topk,
    tag_limit,
)


def check_active_ranks(active_ranks: Any, num_ranks: int, device: torch.device) -> None:
    """int32, one dimension, at least ``R`` entries (the first ``R`` are used: SGLang passes its
    ``max_ep_size`` slots, Mooncake's tests one per token), on ``device``, contiguous."""
    check_tensor("active_ranks", active_ranks, torch.int32, (None,), device)
    if active_ranks.shape[0] < num_ranks:
        raise ValueError(
            f"active_ranks has shape {list(active_ranks.shape)} but the group has R={num_ranks} "
            f"ranks: it needs at least R entries (shape [{num_ranks}], or longer: only the first "
            f"{num_ranks} are read and written)"
        )


def check_flags(async_finish: Any, return_recv_hook: Any) -> None:
    check_bool("async_finish", async_finish)
    check_bool("return_recv_hook", return_recv_hook)
    if async_finish and return_recv_hook:
        raise tag_limit(
            ValueError(
                "async_finish=True and return_recv_hook=True cannot be combined: with the hook "
                "the receive phase runs when you call hook(); with async_finish it runs on a "
                "comm stream"
            ),
            Limit.FLAGS,
        )


def validate_dispatch(
    num_ranks: int,
    x: Any,
    topk_idx: Any,
    active_ranks: Any,
    tokens: Any,
    num_experts: Any,
    timeout_us: Any,
    use_fp8: Any,
    round_scale: Any,
    use_ue8m0: Any,
    async_finish: Any,
    return_recv_hook: Any,
    stats: Any,
) -> None:
    check_tensor("x", x, torch.bfloat16, (None, None))
    num_tokens, hidden = x.shape
    check_hidden(hidden, "hidden (x.shape[1])")
    check_tokens_per_rank(tokens)
    if num_tokens > tokens:
        raise tag_limit(
            ValueError(
                f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank="
                f"{tokens} (the limit N <= T)"
            ),
            Limit.TOKENS,
            num_tokens,
        )
    check_experts(num_experts, num_ranks)
    check_tensor("topk_idx", topk_idx, torch.int64, (num_tokens, None), x.device)
    check_topk(topk_idx.shape[1])
    check_active_ranks(active_ranks, num_ranks, x.device)
    check_timeout_us(timeout_us)
    for name, value in (
        ("use_fp8", use_fp8),
        ("round_scale", round_scale),
        ("use_ue8m0", use_ue8m0),
    ):
        check_bool(name, value)
    if round_scale and not use_fp8:
        raise tag_limit(
            ValueError("round_scale=True requires use_fp8=True (it rounds the FP8 scales)"),
            Limit.FLAGS,
        )
    if use_ue8m0 and not round_scale:
        raise tag_limit(
            ValueError("use_ue8m0=True requires round_scale=True (UE8M0 scales are powers of two)"),
            Limit.FLAGS,
        )
    check_flags(async_finish, return_recv_hook)
    if stats is not None:
        check_tensor(
            "cumulative_local_expert_recv_stats",
            stats,
            torch.int32,
            (num_experts // num_ranks,),
            x.device,
        )


def validate_handle(num_ranks: int, handle: Any) -> tuple[int, int, int]:
    """Checks a dispatch handle; returns its ``(T, H, E)``."""
    if not isinstance(handle, (tuple, list)) or len(handle) != 5:
        raise TypeError(
            "handle must be the 5-tuple (src_info, layout_range, T, H, E) returned by dispatch"
        )
    src_info, layout_range, tokens, hidden, num_experts = handle
    check_tokens_per_rank(tokens, "handle[2] (T)")
    check_hidden(hidden, "handle[3] (H)")
    check_experts(num_experts, num_ranks, "handle[4] (E)")
    num_local = num_experts // num_ranks
    check_tensor("handle[0] (src_info)", src_info, torch.int32, (num_local, num_ranks * tokens))
    check_tensor(
        "handle[1] (layout_range)",
        layout_range,
        torch.int64,
        (num_local, num_ranks),
        src_info.device,
    )
    return tokens, hidden, num_experts


def validate_combine(
    num_ranks: int,
    x: Any,
    topk_idx: Any,
    topk_weights: Any,
    active_ranks: Any,
    timeout_us: Any,
    handle: Any,
    zero_copy: Any,
    async_finish: Any,
    return_recv_hook: Any,
    out: Any,
) -> None:
    tokens, hidden, num_experts = validate_handle(num_ranks, handle)
    num_local = num_experts // num_ranks
    check_tensor("x", x, torch.bfloat16, (num_local, num_ranks * tokens, hidden))
    device = x.device
    if handle[0].device != device:
        raise ValueError(f"handle tensors are on {handle[0].device} but x is on {device}")
    check_tensor("topk_idx", topk_idx, torch.int64, (None, None), device)
    num_tokens, topk = topk_idx.shape
    check_topk(topk)
    if num_tokens > tokens:
        raise tag_limit(
            ValueError(
                f"topk_idx has {num_tokens} tokens, more than the handle's T={tokens} (the "
                "limit N <= T)"
            ),
            Limit.TOKENS,
            num_tokens,
        )
    check_tensor("topk_weights", topk_weights, torch.float32, (num_tokens, topk), device)
    check_active_ranks(active_ranks, num_ranks, device)
    check_timeout_us(timeout_us)
    check_bool("zero_copy", zero_copy)
    check_flags(async_finish, return_recv_hook)
    if out is not None:
        check_tensor("out", out, torch.bfloat16, (num_tokens, hidden), device)
