"""The fast path: dispatch/combine CUDA kernels over the P2P device transport (CUDA IPC mappings).

Torch glue only: the kernels live in ``_mooncake_ep_cuda.so`` (``csrc/``, torch-free, loaded with
ctypes by ``mooncake.ep._cuda``); this module allocates outputs, picks streams, and exchanges the
buffer's IPC handles through the group.

``select(group, num_ep_buffer_bytes)`` (``mooncake.ep.transport_select``) is collective and returns
a ``CudaP2PPath`` when every rank has the library, a GPU (sm_90+), a buffer, and can map every
peer's GPU memory (one host), a ``ProxyPath`` (``mooncake.ep.proxy_path``) when the proxy
transport serves, else ``(None, reason)`` on every rank. ``select`` and ``update_ep_member`` run
the same exchanges, so survivors updating and a replacement constructing meet.

Buffer layout: ``mooncake.ep.layout`` (one definition for both paths). Signal words carry the
per-half op sequence number (``(seq << 32) | count`` in dispatch, ``seq`` in combine), kept on the
device, so stale words are never taken as new, no cleaning is needed between ops, and CUDA-graph
replays stay correct.

Environment (same on every rank): ``MOONCAKE_EP_TRANSPORT`` = ``auto`` (default) | ``p2p``
(kernels store straight into peers' memory) | ``p2p-staged`` (the staged put path a proxy/NVSHMEM
transport uses, over the same mappings; for tests) | ``proxy`` | ``portable``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from typing import Any, Callable, Optional

import torch

from . import _cuda
from .event import EventOverlap, current_cuda_stream
from .fast_path_setup import TRANSPORTS, exchange_and_map, transport_kind
from .faults import _armed as _FAULTS_ARMED  # the armed points (a dict, mutated in place)
from .faults import fault_point
from .layout import ep_buffer_layout
from .limits import MAX_TOPK
from .path import PathUnavailable
from .transport_select import reselect, select

logger = logging.getLogger("mooncake.ep")

PHASE_SEND = _cuda.PHASE_SEND
PHASE_RECV = _cuda.PHASE_RECV
# mep_dispatch / mep_combine take one MepOpArgs block (csrc/ep_args.h, _cuda.MepOpArgs), made once
# per (op, half, shape) with the fields that depend on nothing else filled in. The fields that
# change with every call lead the struct; one pack_into writes them (``_cuda.packer`` checks at
# import that they are consecutive and unpadded):
# dispatch: cum_stats, then the common ones (stream, x, topk_idx, active_ranks, timeout_us, N, K,
# flags, phases); combine: the common ones, then topk_weights, out, src_info, layout_range.
_PER_CALL = ("stream", "x", "topk_idx", "active_ranks", "timeout_us", "num_tokens", "topk")
_PER_CALL += ("flags", "phases")
_D_CALL, _D_AT = _cuda.packer("cum_stats", *_PER_CALL)
_C_CALL, _C_AT = _cuda.packer(*_PER_CALL, "topk_weights", "out", "src_info", "layout_range")
# Flags bit: the outputs are the path's cached set; the library then launches nothing on a stream
# under graph capture and answers _cuda.CAPTURING (the op is issued again with fresh outputs).
_CACHED = _cuda.FLAG_CACHED_OUTPUTS
_FP8, _ROUND_SCALE, _UE8M0 = _cuda.FLAG_FP8, _cuda.FLAG_ROUND_SCALE, _cuda.FLAG_UE8M0

__all__ = ["TRANSPORTS", "CudaP2PPath", "select"]


# ---------------------------------------------------------------------------- helpers


def _info_words(num_local: int, rows: int, tokens: int) -> int:
    """int32 words of the allocation behind ``src_info`` (see ``CudaP2PPath._dispatch_outputs``)."""
    return 2 * num_local * rows + tokens * MAX_TOPK


class _DeviceMemory:
    """Wraps a device pointer so ``torch.as_tensor`` can view it (``__cuda_array_interface__``)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def _current_raw_stream(device_index: int) -> int:
    """cudaStream_t of the current stream (the cheap accessor when this torch has it)."""
    return torch.cuda.current_stream(device_index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    _current_raw_stream = torch._C._cuda_getCurrentRawStream


_stream_capturing = getattr(
    torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing
)
_COMPLETE = EventOverlap()  # the event of an op issued without async_finish (stateless once done)


# ---------------------------------------------------------------------------- the path


class CudaP2PPath:
    """``EPPath`` over CUDA kernels and CUDA IPC mappings. ``name = "cuda-p2p"``; ``reason``;
    ``num_ops`` (the half of the next op is ``num_ops % 2``, as in ``Buffer``)."""

    name = "cuda-p2p"
    reads_active_prefix = True  # the kernels read active_ranks[:R] through its address

    def __init__(
        self, group: Any, lib: ctypes.CDLL, ctx: int, device: int, num_bytes: int, grid: int
    ) -> None:
        self.group = group
        self.rank = group.rank()
        self.num_ranks = group.size()
        self.device = torch.device("cuda", device)
        self._device_index = device
        # Blocks per kernel launch, the same on every rank (arrival counters count blocks).
        self.grid = grid
        self.num_ops = 0
        self._lib = lib
        self._ctx: Optional[int] = ctx
        self._ctx_arg: Optional[ctypes.c_void_p] = ctypes.c_void_p(ctx)  # for the untyped calls
        self._nbytes = num_bytes
        self._transport, transport_name = transport_kind()
        self.mode = transport_name  # transport_select's name of this path's transport
        self.reason = (
            f"every peer is reachable through CUDA IPC (P2P device transport, {transport_name}); "
            f"{num_bytes} byte symmetric buffer"
        )
        base = lib.mep_ctx_buffer(ctx)
        self._buffer = torch.as_tensor(_DeviceMemory(base, num_bytes), device=self.device)
        self._layouts: dict[tuple[int, int, int], tuple] = {}
        self._dispatch_fn = lib.mep_dispatch
        self._combine_fn = lib.mep_combine
        self._comm_stream: Optional[torch.cuda.Stream] = None
        self._reuse_outputs = os.environ.get("MOONCAKE_EP_FRESH_OUTPUTS", "0") != "1"
        self._outputs: dict[tuple, torch.Tensor] = {}  # combine outputs [T, H] per half and shape
        # Per half and shape: dispatch outputs + argument block, combine argument block, outputs.
        self._dispatch_entries: dict[tuple, tuple] = {}
        self._combine_argvs: dict[tuple, tuple] = {}
        self._out_views: dict[tuple, torch.Tensor] = {}
        # src_info tensors this path made (id -> tensor): their allocation holds the top-k slots.
        self._slot_rows: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._own_src_info: dict[int, torch.Tensor] = {}  # the cached entries' (a plain dict)
        # (lib came from _cuda.load(), which checked its MepOpArgs layout against ours)

    # ------------------------------------------------------------------ plumbing

    def _clear_caches(self) -> None:
        """Drop outputs and argument blocks (they hold buffer offsets, the grid and the rank)."""
        self._outputs.clear()
        self._dispatch_entries.clear()
        self._own_src_info.clear()
        self._combine_argvs.clear()
        self._out_views.clear()

    def _check_usable(self) -> int:
        if self._ctx is None:
            raise RuntimeError("the fast path was destroyed")
        return self._ctx

    def _layout(self, tokens: int, hidden: int, num_experts: int) -> tuple:
        key = (tokens, hidden, num_experts)
        entry = self._layouts.get(key)
        if entry is None:
            lay = ep_buffer_layout(tokens, hidden, self.num_ranks, num_experts)
            if lay.total_bytes > self._nbytes:
                raise ValueError(
                    f"num_ep_buffer_bytes={self._nbytes} is smaller than "
                    f"Buffer.get_ep_buffer_size_hint(T={tokens}, H={hidden}, R={self.num_ranks}, "
                    f"E={num_experts})={lay.total_bytes}"
                )
            regions = ("dispatch_send", "dispatch_recv", "dispatch_signals", "combine_send")
            regions += ("combine_recv", "combine_signals")
            halves = tuple(
                (*(getattr(h, name).offset for name in regions), lay.control.offset)
                for h in lay.halves
            )
            entry = (halves, lay.msg_bytes)
            self._layouts[key] = entry
        return entry

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        if not t.is_cuda or t.get_device() != self._device_index:
            raise ValueError(
                f"{name} is on {t.device}; the fast path ({self.name}) runs on {self.device}: "
                f"pass tensors on that device (or construct the Buffer with path='portable')"
            )

    def _stream(self) -> int:
        return _current_raw_stream(self._device_index)

    def _begin_async(self) -> torch.cuda.Stream:
        if self._comm_stream is None:  # with one fork event, re-recorded by every op
            self._comm_stream, self._fork = torch.cuda.Stream(self.device), torch.cuda.Event()
        self._fork.record(current_cuda_stream(self._device_index))
        self._comm_stream.wait_event(self._fork)
        return self._comm_stream

    def _finish_async(self, comm: torch.cuda.Stream, tensors: tuple) -> EventOverlap:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t.record_stream(comm)
        event = torch.cuda.Event()
        event.record(comm)
        return EventOverlap(event, tensors)

    def _receive_hook(
        self, fn: Any, args: _cuda.MepOpArgs, what: str, keep: tuple
    ) -> Callable[[], None]:
        """``hook()`` launching the receive phase on the stream current at call time (at most once;
        ``keep`` holds the inputs alive until then), from its own copy of ``args`` (reused by the
        next ops) without the capture check of cached outputs (the send phase chose them)."""
        args = _cuda.MepOpArgs.from_buffer_copy(args)
        args.flags &= ~_CACHED
        pending = [keep]

        def hook() -> None:
            if not pending:
                return
            pending.clear()
            args.phases = PHASE_RECV
            args.stream = self._stream()
            self._launch(fn, args, what)

        return hook

    def _launch(self, fn: Any, args: _cuda.MepOpArgs, what: str) -> None:
        if self._ctx_arg is None:
            raise RuntimeError("the fast path was destroyed")
        rc = fn(self._ctx_arg, ctypes.byref(args))
        if rc != 0:
            _cuda.check(self._lib, rc, what)

    # ------------------------------------------------------------------ outputs

    def _make_dispatch_entry(
        self, half: int, tokens: int, hidden: int, num_experts: int, use_fp8: bool, use_ue8m0: bool
    ) -> tuple:
        """(recv_x, recv_count, handle, tensors to keep alive, argument block, cached flag, the
        block's ``byref``): the outputs of a dispatch and its ``MepOpArgs`` with every field that
        depends only on them (and on the half and shape) filled in; the op fills the rest. Flag 0:
        fresh outputs."""
        halves, msg_bytes = self._layout(tokens, hidden, num_experts)
        num_local, rows, dev = num_experts // self.num_ranks, self.num_ranks * tokens, self.device
        if use_fp8:
            data = torch.empty((num_local, rows, hidden), dtype=torch.float8_e4m3fn, device=dev)
            width = (hidden // 128 + 3) // 4 if use_ue8m0 else hidden // 128
            scale_dtype = torch.int32 if use_ue8m0 else torch.float32
            scales = torch.empty((num_local, width, rows), dtype=scale_dtype, device=dev)
            recv_x: Any = (data, scales.transpose(1, 2))
            keep: tuple = (data, scales)
        else:
            data = torch.empty((num_local, rows, hidden), dtype=torch.bfloat16, device=dev)
            recv_x, keep, scales = data, (data,), None
        recv_count = torch.empty((num_local,), dtype=torch.int32, device=dev)
        # int32 [L*R*T] src_info, [L*R*T] each row's top-k slot, [T*16] the row of this
        # rank's own (token, slot) pairs: combine reads the last two after src_info.
        info = torch.empty((_info_words(num_local, rows, tokens),), dtype=torch.int32, device=dev)
        layout_range = torch.empty((num_local, self.num_ranks), dtype=torch.int64, device=dev)
        src_info = info[: num_local * rows].view(num_local, rows)
        self._slot_rows[id(src_info)] = src_info
        handle = (src_info, layout_range, tokens, hidden, num_experts)
        args = self._shape_args(half, tokens, hidden, num_experts, halves)
        args.recv_x = data.data_ptr()
        args.recv_scales = 0 if scales is None else scales.data_ptr()
        args.recv_count = recv_count.data_ptr()
        args.src_info = info.data_ptr()
        args.layout_range = layout_range.data_ptr()
        args.msg_bytes = msg_bytes
        keep = (*keep, recv_count, info, layout_range)
        return recv_x, recv_count, handle, keep, args, 0, ctypes.byref(args)

    def _shape_args(
        self, half: int, tokens: int, hidden: int, num_experts: int, halves: tuple
    ) -> _cuda.MepOpArgs:
        """A ``MepOpArgs`` with the fields fixed by the shape, the half, the transport and the
        grid."""
        args = _cuda.MepOpArgs()
        args.max_tokens, args.hidden, args.num_experts = tokens, hidden, num_experts
        args.half = half
        args.transport, args.grid = self._transport, self.grid
        (
            args.off_dispatch_send, args.off_dispatch_recv, args.off_dispatch_signals,
            args.off_combine_send, args.off_combine_recv, args.off_combine_signals,
            args.off_control,
        ) = halves[half]  # fmt: skip
        return args

    def _dispatch_entry(self, key: tuple) -> tuple:
        """A new ``_make_dispatch_entry(*key)``, kept for the next dispatches of the same half and
        shape: outputs are reused by the next op of the same kind on the same half, when the
        contract says the old results are dead ("results of at most two ops are alive at once").
        Fresh and not kept with ``MOONCAKE_EP_FRESH_OUTPUTS=1`` or inside a CUDA-graph capture (the
        graph owns them)."""
        entry = self._make_dispatch_entry(*key)
        if not self._reuse_outputs or _stream_capturing():
            return entry
        if len(self._dispatch_entries) >= 8:  # shapes changed: drop the old sets
            self._dispatch_entries.clear()
            self._own_src_info.clear()
        entry = self._dispatch_entries[key] = (*entry[:5], _CACHED, entry[6])
        src_info = entry[2][0]
        self._own_src_info[id(src_info)] = src_info
        return entry

    # ------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        active_ranks: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        timeout_us: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor],
    ) -> tuple[Any, torch.Tensor, tuple, EventOverlap, Optional[Callable[[], None]]]:
        """See ``Buffer.dispatch``. Outputs live on this GPU until the next dispatch on the same
        buffer half (see ``_dispatch_entry``); ``src_info`` heads an int32 allocation that also
        holds each received row's top-k slot (combine reads them there: pass the handle back
        unchanged). Host work per call: no allocation in the steady state, one argument block
        filled in place, one launch; no host synchronisation."""
        if self._ctx_arg is None:
            raise RuntimeError("the fast path was destroyed")
        if x.get_device() != self._device_index:  # -1 for CPU tensors
            self._check_device("x", x)
        num_tokens, hidden = x.shape
        stats = cumulative_local_expert_recv_stats
        comm = self._begin_async() if async_finish else None
        recv_x, recv_count, handle, keep, args, _, _ = self._issue_dispatch(
            (self.num_ops & 1, num_max_dispatch_tokens_per_rank, hidden, num_experts, use_fp8,
             use_ue8m0),
            x.data_ptr(),
            topk_idx.data_ptr(),
            active_ranks.data_ptr(),
            0 if stats is None else stats.data_ptr(),
            num_tokens,
            topk_idx.shape[1],
            use_fp8 * _FP8 | round_scale * _ROUND_SCALE | use_ue8m0 * _UE8M0,
            PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV,
            timeout_us,
            comm.cuda_stream if comm is not None else _current_raw_stream(self._device_index),
        )  # fmt: skip
        event = _COMPLETE
        if comm is not None:
            event = self._finish_async(comm, (x, topk_idx, active_ranks, *keep, stats))
        if not return_recv_hook:
            return recv_x, recv_count, handle, event, None
        hook = self._receive_hook(
            self._dispatch_fn, args, "dispatch receive", (x, topk_idx, active_ranks, stats)
        )
        return recv_x, recv_count, handle, event, hook

    def dispatch_runner(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        active_ranks: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor],
    ) -> Callable[..., Any]:
        """``dispatch`` specialised on an argument signature that ``Buffer`` validated (classes,
        dtypes, shapes, devices, contiguity, scalars, flags): ``run(x, topk_idx, active_ranks,
        timeout_us, stats)`` for every later call with that signature. The tensors passed here are
        only looked at (not kept). A synchronous call without hook skips what the signature
        fixes (the device check, the shapes, the output key, the flags word): its host work is the
        data pointers, one ``pack_into`` and the launch. Other calls run ``dispatch``."""
        T, E, hook = num_max_dispatch_tokens_per_rank, num_experts, return_recv_hook
        if async_finish or hook or not self._reuse_outputs:

            def run_general(x: Any, topk_idx: Any, active: Any, timeout_us: int, stats: Any) -> Any:
                return self.dispatch(
                    x, topk_idx, active, T, E, timeout_us, use_fp8, round_scale, use_ue8m0,
                    async_finish, hook, stats,
                )  # fmt: skip

            return run_general
        if x.get_device() != self._device_index:
            self._check_device("x", x)
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        keys = tuple((half, T, hidden, E, use_fp8, use_ue8m0) for half in (0, 1))
        flags = use_fp8 * _FP8 | round_scale * _ROUND_SCALE | use_ue8m0 * _UE8M0
        issue, device_index = self._issue_dispatch, self._device_index

        def run(
            x: torch.Tensor,
            topk_idx: torch.Tensor,
            active_ranks: torch.Tensor,
            timeout_us: int,
            stats: Optional[torch.Tensor],
        ) -> tuple:
            entry = issue(
                keys[self.num_ops & 1],
                x.data_ptr(),
                topk_idx.data_ptr(),
                active_ranks.data_ptr(),
                0 if stats is None else stats.data_ptr(),
                num_tokens,
                topk,
                flags,
                PHASE_SEND | PHASE_RECV,
                timeout_us,
                _current_raw_stream(device_index),
            )
            return entry[0], entry[1], entry[2], _COMPLETE, None

        return run

    def _issue_dispatch(
        self,
        key: tuple,
        x_ptr: int,
        topk_ptr: int,
        active_ptr: int,
        stats_ptr: int,
        num_tokens: int,
        topk: int,
        flags: int,
        phases: int,
        timeout_us: int,
        stream: int,
    ) -> tuple:
        """Launches one dispatch into the entry of ``key = (half, T, H, E, use_fp8, use_ue8m0)``
        (see ``_dispatch_entry``) and counts the op; the other arguments are the per-call words of
        its ``MepOpArgs`` (``_D_CALL``; ``flags`` without the cached bit). Returns the entry."""
        ctx = self._ctx_arg
        if ctx is None:
            raise RuntimeError("the fast path was destroyed")
        entry = self._dispatch_entries.get(key) or self._dispatch_entry(key)
        self.num_ops += 1
        if _FAULTS_ARMED:
            fault_point("dispatch.start")
        _D_CALL.pack_into(
            entry[4], _D_AT, stats_ptr, stream, x_ptr, topk_ptr, active_ptr, timeout_us, num_tokens,
            topk, flags | entry[5], phases,
        )  # fmt: skip
        rc = self._dispatch_fn(ctx, entry[6])
        if rc != 0:
            entry = self._dispatch_again(rc, key, entry[4])
        if _FAULTS_ARMED:
            fault_point("dispatch.after_send")
        return entry

    def _dispatch_again(self, rc: int, key: tuple, args: _cuda.MepOpArgs) -> tuple:
        """After a failed launch: raise, or (the stream is under graph capture, the library refused
        the cached outputs) issue the op again with fresh outputs; returns their entry."""
        if rc != _cuda.CAPTURING:
            _cuda.check(self._lib, rc, "dispatch")
        entry = self._make_dispatch_entry(*key)
        fresh = entry[4]
        _D_CALL.pack_into(fresh, _D_AT, *_D_CALL.unpack_from(args, _D_AT))
        fresh.flags &= ~_CACHED
        self._launch(self._dispatch_fn, fresh, "dispatch")
        return entry

    # ------------------------------------------------------------------ combine

    def _check_slot_rows(self, src_info: torch.Tensor, num_local: int, rows: int) -> None:
        """``src_info``'s allocation must hold the top-k slots after it (any tensor this path's
        dispatch returned does; the cached entries' ones are known by identity)."""
        if self._slot_rows.get(id(src_info)) is src_info:
            return
        needed = (
            src_info.storage_offset() + _info_words(num_local, rows, rows // self.num_ranks)
        ) * 4
        if (
            not src_info.is_cuda
            or src_info.get_device() != self._device_index
            or not src_info.is_contiguous()
            or src_info.untyped_storage().nbytes() < needed
        ):
            raise ValueError(
                "handle[0] (src_info) must be the tensor this Buffer's dispatch returned (the fast "
                "path keeps each row's top-k slot in the same allocation): pass the dispatch's "
                "handle unchanged"
            )

    def _combine_argv(self, key: tuple) -> tuple:
        """(``MepOpArgs`` with the fields fixed by half and shape, its ``byref``, zero-copy source
        address) of ``key = (half, tokens, hidden, num_experts)``, kept for the next combines."""
        half, tokens, hidden, num_experts = key
        halves, _ = self._layout(tokens, hidden, num_experts)
        args = self._shape_args(half, tokens, hidden, num_experts, halves)
        if len(self._combine_argvs) >= 16:
            self._combine_argvs.clear()
        zero_copy_ptr = self._buffer.data_ptr() + halves[half][3]
        entry = self._combine_argvs[key] = (args, ctypes.byref(args), zero_copy_ptr)
        return entry

    def _combine_out(self, key: tuple) -> tuple[torch.Tensor, int]:
        """(bf16 ``[N, H]`` output, cached flag) for ``key = (half, tokens, hidden, N)``: a view
        of the half's ``[T, H]`` set, kept as ``_dispatch_entry`` says, or fresh (flag 0)."""
        half, tokens, hidden, num_tokens = key
        if not self._reuse_outputs or _stream_capturing():
            return torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self.device), 0
        full_key = (half, tokens, hidden)
        full = self._outputs.get(full_key)
        if full is None:
            if len(self._outputs) >= 16:  # shapes changed: drop the old sets
                self._outputs.clear()
                self._out_views.clear()
            full = torch.empty((tokens, hidden), dtype=torch.bfloat16, device=self.device)
            self._outputs[full_key] = full
        view = full if num_tokens == tokens else full[:num_tokens]
        if len(self._out_views) >= 64:
            self._out_views.clear()
        self._out_views[key] = view
        return view, _CACHED

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        active_ranks: torch.Tensor,
        timeout_us: int,
        handle: tuple,
        zero_copy: bool,
        async_finish: bool,
        return_recv_hook: bool,
        out: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """See ``Buffer.combine``. With ``zero_copy`` the expert outputs are read from this half's
        ``combine_send`` region (``get_next_combine_buffer``) and ``x`` is not read. The output,
        when ``out`` is None, lives until the next combine on the same half and shape."""
        if self._ctx_arg is None:
            raise RuntimeError("the fast path was destroyed")
        if topk_idx.get_device() != self._device_index:
            self._check_device("topk_idx", topk_idx)
        src_info, layout_range, tokens, hidden, num_experts = handle
        num_tokens, topk = topk_idx.shape
        if topk > MAX_TOPK:
            raise ValueError(f"top-k {topk} exceeds {MAX_TOPK}")
        if self._own_src_info.get(id(src_info)) is not src_info:
            self._check_slot_rows(src_info, num_experts // self.num_ranks, self.num_ranks * tokens)
        if not zero_copy and x.get_device() != self._device_index:
            self._check_device("x", x)
        half = self.num_ops & 1
        comm = self._begin_async() if async_finish else None
        out, args = self._issue_combine(
            (half, tokens, hidden, num_experts),
            (half, tokens, hidden, num_tokens),
            out,
            None if zero_copy else x.data_ptr(),
            src_info.data_ptr(),
            layout_range.data_ptr(),
            topk_idx.data_ptr(),
            topk_weights.data_ptr(),
            active_ranks.data_ptr(),
            num_tokens,
            topk,
            PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV,
            timeout_us,
            comm.cuda_stream if comm is not None else _current_raw_stream(self._device_index),
        )
        event = _COMPLETE
        if comm is not None:
            event = self._finish_async(
                comm, (x, topk_idx, topk_weights, active_ranks, src_info, layout_range, out)
            )
        if not return_recv_hook:
            return out, event, None
        keep_alive = (x, topk_idx, topk_weights, active_ranks, src_info, layout_range)
        hook = self._receive_hook(self._combine_fn, args, "combine receive", keep_alive)
        return out, event, hook

    def combine_runner(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        active_ranks: torch.Tensor,
        handle: tuple,
        zero_copy: bool,
        async_finish: bool,
        return_recv_hook: bool,
        out: Optional[torch.Tensor],
    ) -> Callable[..., Any]:
        """As ``dispatch_runner``: ``run(x, topk_idx, topk_weights, active_ranks, timeout_us,
        handle, out)``. The handle's ``src_info`` is still checked per call (a cached entry's by
        identity), since a handle of the same shape may come from either buffer half."""
        hook = return_recv_hook
        if async_finish or hook or not self._reuse_outputs:

            def run_general(
                x: Any, topk: Any, weights: Any, active: Any, timeout_us: int, handle: Any, out: Any
            ) -> Any:
                return self.combine(
                    x, topk, weights, active, timeout_us, handle, zero_copy, async_finish, hook,
                    out,
                )  # fmt: skip

            return run_general
        if topk_idx.get_device() != self._device_index:
            self._check_device("topk_idx", topk_idx)
        if not zero_copy and x.get_device() != self._device_index:
            self._check_device("x", x)
        _, _, tokens, hidden, num_experts = handle
        num_tokens, topk = topk_idx.shape
        if topk > MAX_TOPK:
            raise ValueError(f"top-k {topk} exceeds {MAX_TOPK}")
        num_local, rows = num_experts // self.num_ranks, self.num_ranks * tokens
        args_keys = tuple((half, tokens, hidden, num_experts) for half in (0, 1))
        out_keys = tuple((half, tokens, hidden, num_tokens) for half in (0, 1))
        own, issue, device_index = self._own_src_info, self._issue_combine, self._device_index

        def run(
            x: torch.Tensor,
            topk_idx: torch.Tensor,
            topk_weights: torch.Tensor,
            active_ranks: torch.Tensor,
            timeout_us: int,
            handle: tuple,
            out: Optional[torch.Tensor],
        ) -> tuple:
            src_info = handle[0]
            if own.get(id(src_info)) is not src_info:
                self._check_slot_rows(src_info, num_local, rows)
            half = self.num_ops & 1
            out = issue(
                args_keys[half],
                out_keys[half],
                out,
                None if zero_copy else x.data_ptr(),
                src_info.data_ptr(),
                handle[1].data_ptr(),
                topk_idx.data_ptr(),
                topk_weights.data_ptr(),
                active_ranks.data_ptr(),
                num_tokens,
                topk,
                PHASE_SEND | PHASE_RECV,
                timeout_us,
                _current_raw_stream(device_index),
            )[0]
            return out, _COMPLETE, None

        return run

    def _issue_combine(
        self,
        key: tuple,
        out_key: tuple,
        out: Optional[torch.Tensor],
        x_ptr: Optional[int],
        info_ptr: int,
        layout_ptr: int,
        topk_ptr: int,
        weights_ptr: int,
        active_ptr: int,
        num_tokens: int,
        topk: int,
        phases: int,
        timeout_us: int,
        stream: int,
    ) -> tuple[torch.Tensor, Any]:
        """Launches one combine with the argument block of ``key = (half, T, H, E)`` (see
        ``_combine_argv``) and counts the op: expert outputs at ``x_ptr`` (None: this half's
        zero-copy region), into ``out`` (None: the cached output of ``out_key = (half, T, H, N)``,
        see ``_combine_out``); the rest are the per-call fields of ``_C_CALL``. Returns (output,
        argument block)."""
        ctx = self._ctx_arg
        if ctx is None:
            raise RuntimeError("the fast path was destroyed")
        args, ref, zero_copy_ptr = self._combine_argvs.get(key) or self._combine_argv(key)
        self.num_ops += 1
        if _FAULTS_ARMED:
            fault_point("combine.start")
        cached = 0
        if out is None:
            out = self._out_views.get(out_key)
            cached = _CACHED
            if out is None:
                out, cached = self._combine_out(out_key)
        _C_CALL.pack_into(
            args, _C_AT, stream, zero_copy_ptr if x_ptr is None else x_ptr, topk_ptr, active_ptr,
            timeout_us, num_tokens, topk, cached, phases, weights_ptr, out.data_ptr(), info_ptr,
            layout_ptr,
        )  # fmt: skip
        rc = self._combine_fn(ctx, ref)
        if rc != 0:
            out = self._combine_again(rc, args, num_tokens, key[2])
        if _FAULTS_ARMED:
            fault_point("combine.after_send")
        return out, args

    def _combine_again(
        self, rc: int, args: _cuda.MepOpArgs, num_tokens: int, hidden: int
    ) -> torch.Tensor:
        """As ``_dispatch_again``: raise, or issue the op again into a fresh output (returned)."""
        if rc != _cuda.CAPTURING:
            _cuda.check(self._lib, rc, "combine")
        out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self.device)
        args.out = out.data_ptr()
        args.flags &= ~_CACHED
        self._launch(self._combine_fn, args, "combine")
        return out

    def get_next_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """bf16 ``[L, R*T, H]`` view of the ``combine_send`` region of the half the next op uses."""
        self._check_usable()
        _, _, tokens, hidden, num_experts = handle
        halves, _ = self._layout(tokens, hidden, num_experts)
        offset = halves[self.num_ops & 1][3]
        num_local, rows = num_experts // self.num_ranks, self.num_ranks * tokens
        nbytes = num_local * rows * hidden * 2
        return (
            self._buffer[offset : offset + nbytes]
            .view(torch.bfloat16)
            .view(num_local, rows, hidden)
        )

    # ------------------------------------------------------------------ membership and lifetime

    def update_ep_member(self) -> None:
        """Collective (the same exchanges as ``select``): re-map every peer's buffer from its
        current handle (a replacement process has a new one), then zero the signal words and the op
        sequence numbers on every rank. Raises RuntimeError (on every rank) if a rank cannot take
        part."""
        ctx = self._check_usable()
        torch.cuda.synchronize(self.device)
        _, infos, _ = reselect(self, self._nbytes)  # collectives 1-2 (PathReplaced: another mode)
        local_error = None
        try:
            rank, size = self.group.rank(), self.group.size()
            if rank != self.rank or size != self.num_ranks:
                _cuda.check(self._lib, self._lib.mep_ctx_resize(ctx, rank, size), "mep_ctx_resize")
                self.rank, self.num_ranks = rank, size
                self._layouts.clear()
                self._clear_caches()
        except Exception as exc:
            local_error = f"{type(exc).__name__}: {exc}"
        failure = exchange_and_map(self._lib, ctx, self.group, local_error)  # collectives 3-5
        if failure is not None:
            raise PathUnavailable(f"update_ep_member: the fast path cannot continue: {failure}")
        self.grid = min(i["num_sms"] for i in infos)
        self.num_ops = 0
        self._clear_caches()
        logger.info("rank %d: fast path re-mapped %d peers", self.rank, self.num_ranks)

    def error_flags(self) -> int:
        """Sticky diagnostic bits of the kernels (value 2: a source arrived without its count word;
        4: a dispatched row's index word named no token); 0 when all is well."""
        out = ctypes.c_uint32()
        _cuda.check(
            self._lib,
            self._lib.mep_ctx_error_flags(self._check_usable(), ctypes.byref(out)),
            "error flags",
        )
        return out.value

    def destroy(self) -> None:
        """Local: waits for this GPU's work, closes peer mappings, frees the buffer. Idempotent."""
        ctx, self._ctx, self._ctx_arg = self._ctx, None, None
        if ctx is None:
            return
        self._buffer = None  # type: ignore[assignment]
        self._clear_caches()
        self._lib.mep_ctx_destroy(ctx)

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:
            pass
