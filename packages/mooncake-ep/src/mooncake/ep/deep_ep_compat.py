"""DeepEP drop-in: ``import mooncake.ep.deep_ep_compat as deep_ep``.

Code written for DeepEP's low-latency mode runs unchanged. ``Buffer`` accepts DeepEP's
constructor (arguments that mean nothing here are accepted and ignored) and its low-latency methods
with DeepEP's argument names and return values; ``topk_idx_t`` is DeepEP's expert-id dtype
(``torch.int64``). What DeepEP lacks, fault tolerance on every op, comes from two attributes:

- ``buffer.active_ranks``: int32 ``[R]`` (1 alive, 0 failed), created with the buffer (on the fast
  path's GPU, else on the CPU), moved to the first op's device if that differs, and updated in
  place by every op. Reset it to ones yourself after recovery.
- ``buffer.timeout_us``: the deadline of every op (default ``MOONCAKE_EP_TIMEOUT_US`` or -1 = none).

DeepEP's shrink-mode mask API is a view of ``active_ranks`` (mask 1 = rank 0 there):
``low_latency_query_mask_buffer(mask_status)`` writes ``1 - active_ranks`` into an int32 ``[R]``
tensor, ``low_latency_update_mask_buffer(rank, mask)`` sets one rank's entry,
``low_latency_clean_mask_buffer()`` unmasks every rank; all three are ordered on the current stream
(no host synchronisation on CUDA). Ops never send to or wait for a masked rank, and mask a rank
that fails or times out. It works with or without ``enable_shrink``, since every op here is fault
tolerant; ``clean_low_latency_buffer`` exchanges nothing, so a rank that died at that point is
masked by the next op instead.

Not supported: DeepEP's normal (high-throughput) mode (``dispatch``, ``combine`` and
``get_dispatch_layout`` raise ``NotImplementedError``); ``use_logfmt`` (accepted; combine stays
BF16, which is more precise); ``*_wait_recv_cost_stats`` (accepted, left unchanged); ``comm``
(mpi4py) instead of a process group.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch

from .buffer import Buffer as _MooncakeBuffer
from .event import EventOverlap
from .layout import ep_buffer_size_hint
from .limits import check_int, check_shape_limits, check_tensor

__all__ = ["Buffer", "EventOverlap", "topk_idx_t"]

logger = logging.getLogger("mooncake.ep")

topk_idx_t = torch.int64  # DeepEP's dtype of topk_idx

_no_torch_function = torch._C.DisableTorchFunction  # see mooncake.ep.buffer


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
        if group is None:
            raise TypeError(
                "group is None: Mooncake EP needs a torch.distributed ProcessGroup (DeepEP's "
                "comm=mpi4py communicator is not supported)"
            )
        self._buffer = _MooncakeBuffer(group, num_rdma_bytes)
        self.group = group
        self.rank = self._buffer.rank
        self.group_size = self._buffer.num_ranks
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.timeout_us = int(os.environ.get("MOONCAKE_EP_TIMEOUT_US", "-1"))
        device = getattr(self._buffer.path, "device", None) or torch.device("cpu")
        self._active_ranks = torch.ones(self.group_size, dtype=torch.int32, device=device)
        self._warned_logfmt = False

    # ------------------------------------------------------------------ Mooncake additions

    @property
    def mooncake_buffer(self) -> _MooncakeBuffer:
        """The underlying ``mooncake.mooncake_ep_buffer.Buffer``."""
        return self._buffer

    @property
    def active_ranks(self) -> torch.Tensor:
        return self._active_ranks

    @active_ranks.setter
    def active_ranks(self, value: torch.Tensor) -> None:
        self._active_ranks = value

    def _active_on(self, device: Any) -> torch.Tensor:
        """``active_ranks`` on ``device`` (moved there, values kept, when it is elsewhere)."""
        active = self._active_ranks
        if device is not None and active.device != device:
            active = self._active_ranks = active.to(device)
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

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current CUDA stream (DeepEP's ``Buffer.capture``)."""
        event = torch.cuda.Event()
        event.record()
        return EventOverlap(event)

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
        with _no_torch_function():  # see mooncake.ep.buffer: tensor attributes stay cheap
            active = self._active_ranks
            device = getattr(x, "device", None)
            if device is not None and active.device != device:
                active = self._active_on(device)
            return self._buffer.dispatch(
                x, topk_idx, active, num_max_dispatch_tokens_per_rank, num_experts,
                self.timeout_us, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook,
                cumulative_local_expert_recv_stats,
            )  # fmt: skip

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
        with _no_torch_function():
            active = self._active_ranks
            device = getattr(x, "device", None)
            if device is not None and active.device != device:
                active = self._active_on(device)
            return self._buffer.combine(
                x, topk_idx, topk_weights, active, self.timeout_us, handle, zero_copy,
                async_finish, return_recv_hook, out,
            )  # fmt: skip

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        return self._buffer.get_next_combine_buffer(handle)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Nothing to clean on either path (the fast path's signal words carry op sequence
        numbers, the portable path keeps no state between ops); the arguments are checked
        against the limits. A path that needs cleaning provides ``clean_buffer(T, H, E)``."""
        check_shape_limits(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        clean = getattr(self._buffer.path, "clean_buffer", None)
        if clean is not None:
            clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # ------------------------------------------------------------------ DeepEP's mask API

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``: ops neither send to nor wait for it) or unmask one rank."""
        check_int("rank_to_mask", rank_to_mask)
        if not 0 <= rank_to_mask < self.group_size:
            raise ValueError(
                f"rank_to_mask={rank_to_mask} is out of range: 0 <= rank_to_mask < "
                f"{self.group_size} (the group's ranks)"
            )
        self._active_ranks[rank_to_mask] = 0 if mask else 1

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Writes each rank's mask (1 masked or failed, 0 usable) into ``mask_status`` (int32
        ``[R]``; a longer tensor gets the first ``R`` entries)."""
        check_tensor("mask_status", mask_status, torch.int32, (None,), contiguous=False)
        if mask_status.shape[0] < self.group_size:
            raise ValueError(
                f"mask_status has shape {list(mask_status.shape)}; it needs at least R="
                f"{self.group_size} entries"
            )
        size = self.group_size
        mask_status[:size].copy_(self._active_ranks[:size] == 0)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank (``active_ranks`` back to ones)."""
        self._active_ranks.fill_(1)

    # ------------------------------------------------------------------ lifetime

    def destroy(self) -> None:
        """Releases the buffer (local, idempotent). DeepEP asks for ``explicitly_destroy=True``
        first; here the resources are also released by the garbage collector, so both work."""
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
