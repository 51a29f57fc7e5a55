"""The fast path: dispatch/combine CUDA kernels over the P2P device transport (CUDA IPC mappings).

Torch glue only: the kernels live in ``_mooncake_ep_cuda.so`` (``csrc/``, torch-free, loaded with
ctypes by ``mooncake.ep._cuda``); this module allocates outputs, picks streams, and exchanges the
buffer's IPC handles through the group.

``select(group, num_ep_buffer_bytes)`` is collective and returns a ``CudaP2PPath`` when every rank
has the library, a GPU (sm_90+), a buffer, and can map every peer's GPU memory (one host); else
``(None, reason)`` on every rank. ``select`` and ``CudaP2PPath.update_ep_member`` run the same four
``all_gather_object`` calls, so survivors updating and a replacement constructing meet:
``info`` (can this rank use the path), ``handles`` (IPC handle of each rank's buffer), ``opened``
(did every rank map every peer), ``ready`` (every rank zeroed its signal words).

Buffer layout: ``mooncake.ep.layout`` (one definition for both paths). Signal words carry the
per-half op sequence number (``(seq << 32) | count`` in dispatch, ``seq`` in combine), kept on the
device, so stale words are never taken as new, no cleaning is needed between ops, and CUDA-graph
replays stay correct.

Environment (same on every rank): ``MOONCAKE_EP_TRANSPORT`` = ``p2p`` (default: kernels store
straight into peers' memory) | ``p2p-staged`` (the staged put path a proxy/NVSHMEM transport uses,
over the same mappings; for tests).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import socket
import weakref
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import _cuda
from .event import EventOverlap
from .faults import _armed as _FAULTS_ARMED  # the armed points (a dict, mutated in place)
from .faults import fault_point
from .layout import ep_buffer_layout
from .limits import MAX_TOPK
from .path import control_device

logger = logging.getLogger("mooncake.ep")

PHASE_SEND = 1
PHASE_RECV = 2
TRANSPORTS = {"p2p": 0, "p2p-staged": 1}
# Argument vectors of mep_dispatch / mep_combine (csrc/ep_capi.cu, enums DispatchArg/CombineArg).
_D_ARGS = 29
_C_ARGS = 25

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
_COMPLETE = (
    EventOverlap()
)  # the event of an op issued without async_finish (stateless once complete)


def _host_identity() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)


def _gather(group: Any, obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` (two all_gathers on the group's control device; numpy-free,
    unlike ``all_gather_object``). A rank that did not answer (zero-filled slot) gives None."""
    size = group.size()
    device = control_device(group)
    payload = pickle.dumps(obj)
    sizes = torch.zeros(size, dtype=torch.int64, device=device)
    _all_gather_single(sizes, torch.tensor([len(payload)], dtype=torch.int64, device=device), group)
    lengths = sizes.cpu().tolist()
    width = max(lengths)
    mine = torch.zeros(width, dtype=torch.uint8)
    mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    everyone = torch.zeros(size * width, dtype=torch.uint8, device=device)
    _all_gather_single(everyone, mine.to(device), group)
    raw = everyone.cpu()
    return [
        pickle.loads(bytes(raw[r * width : r * width + n].tolist())) if n > 0 else None
        for r, n in enumerate(lengths)
    ]


def _first_failure(answers: list[dict]) -> Optional[str]:
    for rank, answer in enumerate(answers):
        if answer is None:
            return f"rank {rank} did not answer"
        if not answer.get("ok"):
            return f"rank {rank}: {answer.get('reason')}"
    return None


def _transport_kind() -> tuple[int, str]:
    name = os.environ.get("MOONCAKE_EP_TRANSPORT", "p2p")
    if name not in TRANSPORTS:
        raise ValueError(f"MOONCAKE_EP_TRANSPORT={name!r} is not one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name], name


def _probe(num_ep_buffer_bytes: int) -> dict:
    """This rank's answer to 'can you use the fast path' (never raises)."""
    info: dict = {
        "ok": False,
        "reason": "",
        "host": _host_identity(),
        "bus_id": "",
        "transport": "",
    }
    try:
        if num_ep_buffer_bytes <= 0:
            info["reason"] = (
                "num_ep_buffer_bytes=0 (pass Buffer.get_ep_buffer_size_hint(T, H, R, E) to use it)"
            )
            return info
        if not torch.cuda.is_available():
            info["reason"] = "CUDA is not available in this process"
            return info
        try:
            lib = _cuda.load()
        except OSError as exc:
            info["reason"] = f"the CUDA library is not usable: {exc}"
            return info
        device = torch.cuda.current_device()
        bus = ctypes.create_string_buffer(64)
        major, minor, sms = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        _cuda.check(lib, lib.mep_device_info(device, bus, 64, major, minor, sms), "mep_device_info")
        if major.value < 9:
            info["reason"] = (
                f"GPU {device} is sm_{major.value}{minor.value}; the kernels need sm_90 or newer"
            )
            return info
        _, info["transport"] = _transport_kind()
        info.update(ok=True, bus_id=bus.value.decode(), device=device, num_sms=sms.value)
    except Exception as exc:
        info.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
    return info


def _reachability(lib: ctypes.CDLL, device: int, infos: list[dict]) -> Optional[str]:
    """None when this rank can map every peer's GPU memory, else why not."""
    hosts = {i["host"] for i in infos}
    if len(hosts) > 1:
        return (
            f"ranks are on {len(hosts)} hosts; the P2P transport needs one host "
            f"(no proxy transport built)"
        )
    if len({i["transport"] for i in infos}) > 1:
        return "MOONCAKE_EP_TRANSPORT differs between ranks"
    for rank, info in enumerate(infos):
        out = ctypes.c_int()
        _cuda.check(
            lib,
            lib.mep_can_reach(device, info["bus_id"].encode(), ctypes.byref(out)),
            "mep_can_reach",
        )
        if not out.value:
            return f"GPU {info['bus_id']} of rank {rank} is not peer-accessible from GPU {device}"
    return None


def _exchange_and_map(
    lib: ctypes.CDLL, ctx: Any, group: Any, local_error: Optional[str]
) -> Optional[str]:
    """Collectives 2-4 (handles, opened, ready). Returns None on success, else the reason (same on
    every rank)."""
    handle = None
    if local_error is None:
        try:
            raw = ctypes.create_string_buffer(_cuda.IPC_HANDLE_BYTES)
            _cuda.check(lib, lib.mep_ctx_export(ctx, raw), "mep_ctx_export")
            handle = raw.raw
        except Exception as exc:
            local_error = f"{type(exc).__name__}: {exc}"
    answers = _gather(group, {"ok": local_error is None, "reason": local_error, "handle": handle})
    failure = _first_failure(answers)
    opened_error = None
    if failure is None:
        try:
            for peer, answer in enumerate(answers):
                _cuda.check(
                    lib,
                    lib.mep_ctx_set_peer(ctx, peer, answer["handle"]),
                    f"mapping rank {peer}'s buffer",
                )
            _cuda.check(lib, lib.mep_ctx_commit(ctx), "mep_ctx_commit")
        except Exception as exc:
            opened_error = f"{type(exc).__name__}: {exc}"
    opened = _gather(
        group, {"ok": failure is None and opened_error is None, "reason": failure or opened_error}
    )
    failure = failure or _first_failure(opened)
    ready_error = None
    if failure is None:
        try:
            _cuda.check(lib, lib.mep_ctx_reset(ctx), "mep_ctx_reset")
        except Exception as exc:
            ready_error = f"{type(exc).__name__}: {exc}"
    ready = _gather(
        group, {"ok": failure is None and ready_error is None, "reason": failure or ready_error}
    )
    return failure or _first_failure(ready)


# ---------------------------------------------------------------------------- selection


def select(group: Any, num_ep_buffer_bytes: int) -> Any:
    """Collective. ``CudaP2PPath`` on every rank, or ``(None, reason)`` on every rank."""
    info = _probe(num_ep_buffer_bytes)
    infos = _gather(group, info)  # collective 1
    failure = _first_failure(infos)
    if failure is not None:
        return None, failure
    lib = _cuda.load()
    device = info["device"]
    ctx = None
    local_error = None
    try:
        local_error = _reachability(lib, device, infos)
        if local_error is None:
            out = ctypes.c_void_p()
            rc = lib.mep_ctx_create(
                device, group.rank(), group.size(), num_ep_buffer_bytes, ctypes.byref(out)
            )
            _cuda.check(lib, rc, f"allocating the {num_ep_buffer_bytes}-byte symmetric buffer")
            ctx = out.value
    except Exception as exc:
        local_error = f"{type(exc).__name__}: {exc}"
    failure = _exchange_and_map(lib, ctx, group, local_error)  # collectives 2-4
    if failure is not None:
        if ctx is not None:
            lib.mep_ctx_destroy(ctx)
        return None, failure
    return CudaP2PPath(
        group, lib, ctx, device, num_ep_buffer_bytes, min(i["num_sms"] for i in infos)
    )


# ---------------------------------------------------------------------------- the path


class CudaP2PPath:
    """``EPPath`` over CUDA kernels and CUDA IPC mappings. ``name = "cuda-p2p"``; ``reason``;
    ``num_ops`` (the half of the next op is ``num_ops % 2``, as in ``Buffer``)."""

    name = "cuda-p2p"

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
        self._nbytes = num_bytes
        self._transport, transport_name = _transport_kind()
        self.reason = (
            f"every peer is reachable through CUDA IPC (P2P device transport, {transport_name}); "
            f"{num_bytes} byte symmetric buffer"
        )
        base = lib.mep_ctx_buffer(ctx)
        self._buffer = torch.as_tensor(_DeviceMemory(base, num_bytes), device=self.device)
        self._layouts: dict[tuple[int, int, int], tuple] = {}
        self._dargs = (ctypes.c_int64 * _D_ARGS)()
        self._cargs = (ctypes.c_int64 * _C_ARGS)()
        self._dispatch_fn = lib.mep_dispatch
        self._combine_fn = lib.mep_combine
        self._comm_stream: Optional[torch.cuda.Stream] = None
        self._reuse_outputs = os.environ.get("MOONCAKE_EP_FRESH_OUTPUTS", "0") != "1"
        self._outputs: dict[tuple, tuple] = {}
        # Per half and shape: dispatch outputs + argument vector, combine argument vector, outputs.
        self._dispatch_entries: dict[tuple, tuple] = {}
        self._combine_argvs: dict[tuple, tuple] = {}
        self._out_views: dict[tuple, torch.Tensor] = {}
        # src_info tensors this path made (id -> tensor): their allocation holds the top-k slots.
        self._slot_rows: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        if lib.mep_dispatch_num_args() != _D_ARGS or lib.mep_combine_num_args() != _C_ARGS:
            raise RuntimeError(
                "the CUDA library's argument layout differs from fast_path.py: stale build"
            )

    # ------------------------------------------------------------------ plumbing

    def _clear_caches(self) -> None:
        """Drop outputs and argument vectors (they hold buffer offsets, the grid and the rank)."""
        self._outputs.clear()
        self._dispatch_entries.clear()
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
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream(device=self.device)
        self._comm_stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._comm_stream

    def _finish_async(self, comm: torch.cuda.Stream, tensors: tuple) -> EventOverlap:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t.record_stream(comm)
        event = torch.cuda.Event()
        event.record(comm)
        return EventOverlap(event, tensors)

    def _receive_hook(
        self,
        fn: Any,
        argv: Any,
        nargs: int,
        phase_at: int,
        stream_at: int,
        what: str,
        keep: tuple,
    ) -> Callable[[], None]:
        """``hook()`` launching the receive phase on the stream current at call time (at most once;
        ``keep`` holds the inputs alive until then). It launches from its own copy of ``argv`` (the
        path reuses its argument vectors for the next ops)."""
        args = type(argv).from_buffer_copy(argv)
        pending = [keep]

        def hook() -> None:
            if not pending:
                return
            pending.clear()
            args[phase_at] = PHASE_RECV
            args[stream_at] = self._stream()
            self._launch(fn, args, nargs, what)

        return hook

    def _launch(self, fn: Any, args: Any, nargs: int, what: str) -> None:
        rc = fn(self._ctx, args, nargs)
        if rc != 0:
            _cuda.check(self._lib, rc, what)

    # ------------------------------------------------------------------ outputs

    def _cached(self, key: tuple, make: Callable[[], tuple]) -> tuple:
        """Output tensors for ``key`` (which includes the buffer half). Reused by the next op of the
        same kind on the same half, when the contract says the old results are dead ("results of at
        most two ops are alive at once"); fresh inside a CUDA-graph capture (the graph owns them) or
        with ``MOONCAKE_EP_FRESH_OUTPUTS=1``."""
        if not self._reuse_outputs or _stream_capturing():
            return make()
        entry = self._outputs.get(key)
        if entry is None:
            if len(self._outputs) >= 16:  # shapes changed: drop the old sets
                self._outputs.clear()
                self._out_views.clear()
            entry = self._outputs[key] = make()
        return entry

    def _make_dispatch_entry(
        self, half: int, tokens: int, hidden: int, num_experts: int, use_fp8: bool, use_ue8m0: bool
    ) -> tuple:
        """(recv_x, recv_count, handle, tensors to keep alive, argument vector): the outputs of a
        dispatch and its argument vector with every field that depends only on them (and on the
        half and shape) filled in; the op fills the rest."""
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
        argv = (ctypes.c_int64 * _D_ARGS)()
        argv[3:8] = [
            data.data_ptr(),
            0 if scales is None else scales.data_ptr(),
            recv_count.data_ptr(),
            info.data_ptr(),
            layout_range.data_ptr(),
        ]
        argv[10], argv[11], argv[13], argv[14] = tokens, hidden, num_experts, half
        argv[19:26] = list(halves[half])
        argv[26], argv[27], argv[28] = msg_bytes, self._transport, self.grid
        return recv_x, recv_count, handle, (*keep, recv_count, info, layout_range), argv

    def _dispatch_entry(
        self, half: int, tokens: int, hidden: int, num_experts: int, use_fp8: bool, use_ue8m0: bool
    ) -> tuple:
        """``_make_dispatch_entry``, reused as ``_cached`` says (one set per half and shape)."""
        key = (half, tokens, hidden, num_experts, use_fp8, use_ue8m0)
        if not self._reuse_outputs or _stream_capturing():
            return self._make_dispatch_entry(*key)
        entry = self._dispatch_entries.get(key)
        if entry is None:
            if len(self._dispatch_entries) >= 8:  # shapes changed: drop the old sets
                self._dispatch_entries.clear()
            entry = self._dispatch_entries[key] = self._make_dispatch_entry(*key)
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
        buffer half (see ``_cached``); ``src_info`` heads an int32 allocation that also holds each
        received row's top-k slot (combine reads them there: pass the handle back unchanged).
        Host work per call: no allocation in the steady state, one argument vector filled in place,
        one launch; no host synchronisation."""
        if self._ctx is None:
            raise RuntimeError("the fast path was destroyed")
        if x.get_device() != self._device_index:  # -1 for CPU tensors
            self._check_device("x", x)
        num_tokens, hidden = x.shape
        half = self.num_ops & 1
        recv_x, recv_count, handle, keep, argv = self._dispatch_entry(
            half, num_max_dispatch_tokens_per_rank, hidden, num_experts, use_fp8, use_ue8m0
        )
        self.num_ops += 1
        if _FAULTS_ARMED:
            fault_point("dispatch.start")
        stats = cumulative_local_expert_recv_stats
        comm = self._begin_async() if async_finish else None
        argv[0] = x.data_ptr()
        argv[1] = topk_idx.data_ptr()
        argv[2] = active_ranks.data_ptr()
        argv[8] = 0 if stats is None else stats.data_ptr()
        argv[9] = num_tokens
        argv[12] = topk_idx.shape[1]
        argv[15] = use_fp8 | (round_scale << 1) | (use_ue8m0 << 2)
        argv[16] = PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV
        argv[17] = timeout_us
        argv[18] = comm.cuda_stream if comm is not None else _current_raw_stream(self._device_index)
        self._dargs = argv
        rc = self._dispatch_fn(self._ctx, argv, _D_ARGS)
        if rc != 0:
            _cuda.check(self._lib, rc, "dispatch")
        if _FAULTS_ARMED:
            fault_point("dispatch.after_send")
        event = _COMPLETE
        if comm is not None:
            event = self._finish_async(comm, (x, topk_idx, active_ranks, *keep, stats))
        if not return_recv_hook:
            return recv_x, recv_count, handle, event, None
        hook = self._receive_hook(
            self._dispatch_fn,
            argv,
            _D_ARGS,
            16,
            18,
            "dispatch receive",
            (x, topk_idx, active_ranks, stats),
        )
        return recv_x, recv_count, handle, event, hook

    # ------------------------------------------------------------------ combine

    def _slot_rows_ptr(self, src_info: torch.Tensor, num_local: int, rows: int) -> int:
        """``src_info``'s pointer, after checking its allocation holds the top-k slots after it."""
        known = self._slot_rows.get(id(src_info))
        if known is src_info:
            return src_info.data_ptr()
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
        return src_info.data_ptr()

    def _combine_argv(self, half: int, tokens: int, hidden: int, num_experts: int) -> tuple:
        """(argument vector with the fields fixed by half and shape, zero-copy source address)."""
        key = (half, tokens, hidden, num_experts)
        entry = self._combine_argvs.get(key)
        if entry is None:
            halves, _ = self._layout(tokens, hidden, num_experts)
            argv = (ctypes.c_int64 * _C_ARGS)()
            argv[8], argv[9], argv[11], argv[12] = tokens, hidden, num_experts, half
            argv[16:23] = list(halves[half])
            argv[23], argv[24] = self._transport, self.grid
            if len(self._combine_argvs) >= 16:
                self._combine_argvs.clear()
            entry = self._combine_argvs[key] = (argv, self._buffer.data_ptr() + halves[half][3])
        return entry

    def _combine_out(self, half: int, tokens: int, hidden: int, num_tokens: int) -> torch.Tensor:
        """bf16 ``[N, H]`` output: a view of the half's ``[T, H]`` set (see ``_cached``)."""
        if not self._reuse_outputs or _stream_capturing():
            return torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self.device)
        key = (half, tokens, hidden, num_tokens)
        view = self._out_views.get(key)
        if view is None:
            full = self._cached(
                ("combine", half, tokens, hidden),
                lambda: (torch.empty((tokens, hidden), dtype=torch.bfloat16, device=self.device),),
            )[0]
            view = full if num_tokens == tokens else full[:num_tokens]
            if len(self._out_views) >= 64:
                self._out_views.clear()
            self._out_views[key] = view
        return view

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
        ``combine_send`` region (``get_next_combine_buffer``) and ``x`` is not read."""
        if self._ctx is None:
            raise RuntimeError("the fast path was destroyed")
        if topk_idx.get_device() != self._device_index:
            self._check_device("topk_idx", topk_idx)
        src_info, layout_range, tokens, hidden, num_experts = handle
        num_tokens, topk = topk_idx.shape
        if topk > MAX_TOPK:
            raise ValueError(f"top-k {topk} exceeds {MAX_TOPK}")
        info_ptr = self._slot_rows_ptr(
            src_info, num_experts // self.num_ranks, self.num_ranks * tokens
        )
        half = self.num_ops & 1
        argv, zero_copy_ptr = self._combine_argv(half, tokens, hidden, num_experts)
        self.num_ops += 1
        if _FAULTS_ARMED:
            fault_point("combine.start")
        if zero_copy:
            x_ptr = zero_copy_ptr
        else:
            if x.get_device() != self._device_index:
                self._check_device("x", x)
            x_ptr = x.data_ptr()
        if out is None:
            out = self._combine_out(half, tokens, hidden, num_tokens)
        comm = self._begin_async() if async_finish else None
        argv[0] = x_ptr
        argv[1] = info_ptr
        argv[2] = layout_range.data_ptr()
        argv[3] = topk_idx.data_ptr()
        argv[4] = topk_weights.data_ptr()
        argv[5] = active_ranks.data_ptr()
        argv[6] = out.data_ptr()
        argv[7] = num_tokens
        argv[10] = topk
        argv[13] = PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV
        argv[14] = timeout_us
        argv[15] = comm.cuda_stream if comm is not None else _current_raw_stream(self._device_index)
        self._cargs = argv
        rc = self._combine_fn(self._ctx, argv, _C_ARGS)
        if rc != 0:
            _cuda.check(self._lib, rc, "combine")
        if _FAULTS_ARMED:
            fault_point("combine.after_send")
        event = _COMPLETE
        if comm is not None:
            event = self._finish_async(
                comm, (x, topk_idx, topk_weights, active_ranks, src_info, layout_range, out)
            )
        if not return_recv_hook:
            return out, event, None
        keep_alive = (x, topk_idx, topk_weights, active_ranks, src_info, layout_range)
        hook = self._receive_hook(
            self._combine_fn, argv, _C_ARGS, 13, 15, "combine receive", keep_alive
        )
        return out, event, hook

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
        """Collective (the same four exchanges as ``select``): re-map every peer's buffer from its
        current handle (a replacement process has a new one), then zero the signal words and the op
        sequence numbers on every rank. Raises RuntimeError (on every rank) if a rank cannot take
        part."""
        ctx = self._check_usable()
        torch.cuda.synchronize(self.device)
        info = _probe(self._nbytes)
        infos = _gather(self.group, info)
        failure = _first_failure(infos)
        if failure is not None:
            raise RuntimeError(f"update_ep_member: the fast path cannot continue: {failure}")
        local_error = None
        try:
            local_error = _reachability(self._lib, self.device.index, infos)
            rank, size = self.group.rank(), self.group.size()
            if local_error is None and (rank != self.rank or size != self.num_ranks):
                _cuda.check(self._lib, self._lib.mep_ctx_resize(ctx, rank, size), "mep_ctx_resize")
                self.rank, self.num_ranks = rank, size
                self._layouts.clear()
                self._clear_caches()
        except Exception as exc:
            local_error = f"{type(exc).__name__}: {exc}"
        failure = _exchange_and_map(self._lib, ctx, self.group, local_error)
        if failure is not None:
            raise RuntimeError(f"update_ep_member: the fast path cannot continue: {failure}")
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
        ctx, self._ctx = self._ctx, None
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
