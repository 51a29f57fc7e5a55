"""DeepEP drop-in: ``from mooncake.ep import deep_ep_compat as deep_ep``.

Code written for DeepEP's low-latency mode runs unchanged. ``Buffer`` accepts DeepEP's
constructor (arguments that mean nothing here are accepted and ignored) and its low-latency methods
with DeepEP's argument names and return values. What DeepEP lacks, fault tolerance, comes from two
attributes:

- ``buffer.active_ranks``: int32 ``[R]`` (1 alive, 0 failed), created on the first op's device and
  updated in place by every op. Reset it to ones yourself after recovery.
- ``buffer.timeout_us``: the deadline of every op (default ``MOONCAKE_EP_TIMEOUT_US`` or -1 = none).

Not supported: DeepEP's normal (high-throughput) mode (``dispatch``, ``combine`` and
``get_dispatch_layout`` raise ``NotImplementedError``); ``use_logfmt`` (accepted; combine stays
BF16, which is more precise); ``*_wait_recv_cost_stats`` (accepted, left unchanged).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch

from .buffer import Buffer as _MooncakeBuffer
from .event import EventOverlap
from .layout import ep_buffer_size_hint

__all__ = ["Buffer", "EventOverlap"]

logger = logging.getLogger("mooncake.ep")


class Buffer:
    """DeepEP's ``deep_ep.Buffer`` (low-latency mode) on Mooncake EP."""

    num_sms: int = 20

    def __init__(
        self,
        group: Any,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        use_fabric: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
    ) -> None:
        self._buffer = _MooncakeBuffer(group, num_rdma_bytes)
        self.group = group
        self.rank = self._buffer.rank
        self.group_size = self._buffer.num_ranks
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.timeout_us = int(os.environ.get("MOONCAKE_EP_TIMEOUT_US", "-1"))
        self._active_ranks: Optional[torch.Tensor] = None
        self._warned_logfmt = False

    # ------------------------------------------------------------------ Mooncake additions

    @property
    def mooncake_buffer(self) -> _MooncakeBuffer:
        """The underlying ``mooncake.mooncake_ep_buffer.Buffer``."""
        return self._buffer

    @property
    def active_ranks(self) -> torch.Tensor:
        if self._active_ranks is None:
            self._active_ranks = torch.ones(self.group_size, dtype=torch.int32)
        return self._active_ranks

    @active_ranks.setter
    def active_ranks(self, value: torch.Tensor) -> None:
        self._active_ranks = value

    def _active_on(self, device: torch.device) -> torch.Tensor:
        active = self.active_ranks
        if active.device != device:
            active = active.to(device)
            self._active_ranks = active
        return active

    # ------------------------------------------------------------------ DeepEP statics

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        return ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ------------------------------------------------------------------ low-latency API

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Any, torch.Tensor, tuple, EventOverlap, Optional[Callable[[], None]]]:
        """DeepEP's ``low_latency_dispatch``; shapes as in ``mooncake.ep.buffer.Buffer.dispatch``"""
        return self._buffer.dispatch(
            x,
            topk_idx,
            self._active_on(x.device),
            num_max_dispatch_tokens_per_rank,
            num_experts,
            self.timeout_us,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """DeepEP's ``low_latency_combine``; shapes as in ``mooncake.ep.buffer.Buffer.combine``."""
        if use_logfmt and not self._warned_logfmt:
            logger.warning(
                "use_logfmt=True is accepted but ignored: combine sends BF16 (more precise)"
            )
            self._warned_logfmt = True
        return self._buffer.combine(
            x,
            topk_idx,
            topk_weights,
            self._active_on(x.device),
            self.timeout_us,
            handle,
            zero_copy=zero_copy,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
            out=out,
        )

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        return self._buffer.get_next_combine_buffer(handle)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """The portable path keeps no state between ops, so this is a no-op there; a path that needs
        cleaning provides ``clean_buffer(T, H, E)``, which is called."""
        clean = getattr(self._buffer.path, "clean_buffer", None)
        if clean is not None:
            clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def destroy(self) -> None:
        self._buffer.destroy()

    # ------------------------------------------------------------------ normal mode: not provided

    def _normal_mode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "DeepEP's normal (high-throughput) mode is not provided by Mooncake EP; use the "
            "low_latency_* methods"
        )

    get_dispatch_layout = _normal_mode
    dispatch = _normal_mode
    combine = _normal_mode
    internode_dispatch = _normal_mode
    internode_combine = _normal_mode
