"""``Buffer``: the low-latency expert-parallel API with fault tolerance (docs/contracts/ep.md).

Notation: ``R`` ranks of the group, ``E`` experts (``E % R == 0``), ``L = E / R`` local experts,
``T = num_max_dispatch_tokens_per_rank`` (the same on every rank), ``H`` hidden (a multiple of 128),
``K`` top-k (<= 16), ``N`` tokens on this rank (``N <= T``, may differ per rank). Rank ``r`` owns
experts ``[r*L, (r+1)*L)``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .event import EventOverlap
from .layout import ep_buffer_size_hint
from .limits import MAX_TIMEOUT_US, check_int, check_topk_values
from .path import (
    EPPath,
    PathReplaced,
    PathUnavailable,
    agree_on_path,
    requested_path,
    select_path,
)
from .portable_path import PortablePath
from .validation import validate_combine, validate_dispatch, validate_handle

logger = logging.getLogger("mooncake.ep")

# The ops run with torch's Python function handling off. Clients call
# ``torch.set_default_device("cuda")`` (DeepEP's and Mooncake's tests, SGLang's runners), which
# installs a TorchFunctionMode: every tensor attribute read and method call (``x.shape``,
# ``x.data_ptr()``) then goes through a Python ``__torch_function__``, about a microsecond each, and
# the signature check plus the launch read about 55 of them per dispatch + combine. EP passes an
# explicit device to every allocation, so the default device means nothing to it.
_no_torch_function = torch._C.DisableTorchFunction

# Argument signatures already validated, per op kind: the steady state (same shapes, dtypes,
# devices, flags every call) skips the checks; any change is checked again in full.
_MAX_SIGNATURES = 1024  # N may differ per call: one entry per N seen

DispatchResult = tuple[Any, torch.Tensor, tuple, EventOverlap, Optional[Callable[[], None]]]
CombineResult = tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]
# What a validated signature maps to: (whether the expert ids still need a per-call value check,
# the op specialised on the signature: dispatch(x, topk_idx, active_ranks, timeout_us, stats),
# combine(x, topk_idx, topk_weights, active_ranks, timeout_us, handle, out)).
Validated = tuple[bool, Callable[..., Any]]


class Buffer:
    """Expert-parallel dispatch and combine over one process group, surviving rank failures.

    Construction is collective over ``group`` (the ranks agree on a path). One instance per group.

    Args:
        group: a ``torch.distributed.ProcessGroup``; normally a Mooncake backend group
            (``"mooncake"`` for CUDA tensors, ``"mooncake-cpu"`` for CPU tensors). Any backend
            works through the portable path, but only the Mooncake backend survives failures.
        num_ep_buffer_bytes: bytes of the fast path's symmetric buffer, normally
            ``Buffer.get_ep_buffer_size_hint(T, H, R, E)``. Unused by the portable path.
        path: ``"auto"`` (default), ``"portable"`` or ``"fast"``; when None, ``MOONCAKE_EP_PATH``
            decides (default ``auto``). Must be the same on every rank.

    Attributes:
        path: the selected implementation; ``path.name`` is ``"portable"`` or the fast path's name,
            ``path.reason`` says why it was chosen (also ``path_name`` and ``path_reason``).
        rank, num_ranks: this rank's index and ``R`` (``group_size`` is an alias).
        stats: the path's ``TrafficStats`` (bytes handed to the backend), or None if it keeps none.
    """

    def __init__(
        self, group: Any, num_ep_buffer_bytes: int = 0, *, path: Optional[str] = None
    ) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}"
            )
        check_int("num_ep_buffer_bytes", num_ep_buffer_bytes)
        if num_ep_buffer_bytes < 0:
            raise ValueError(f"num_ep_buffer_bytes={num_ep_buffer_bytes} must be >= 0")
        self._path: Optional[EPPath] = None
        # signature -> Validated
        self._dispatch_ok: dict[tuple, Validated] = {}
        self._combine_ok: dict[tuple, Validated] = {}
        self.group = group
        self.rank = group.rank()
        self.num_ranks = group.size()
        self.num_ep_buffer_bytes = num_ep_buffer_bytes
        self._requested = requested_path(path)
        local = select_path(group, num_ep_buffer_bytes, self._requested)
        try:
            self._path = agree_on_path(group, local, forced=self._requested == "fast")
        except BaseException:
            local.destroy()
            raise
        self.num_ops = 0
        logger.info("rank %d: EP path %s (%s)", self.rank, self._path.name, self._path.reason)

    # ------------------------------------------------------------------ introspection

    @property
    def path(self) -> EPPath:
        """The selected path (``.name``, ``.reason``)."""
        if self._path is None:
            raise RuntimeError("this Buffer was destroyed")
        return self._path

    @property
    def path_name(self) -> str:
        return self.path.name

    @property
    def path_reason(self) -> str:
        return self.path.reason

    @property
    def group_size(self) -> int:
        """``R``, as the classic Mooncake ``Buffer`` and DeepEP name it (SGLang reads it)."""
        return self.num_ranks

    @property
    def _use_fallback(self) -> bool:
        """True on the portable path (the classic Mooncake ``Buffer``'s attribute, which its
        tests read to skip kernel profiling)."""
        return self.path.name == PortablePath.name

    @property
    def stats(self) -> Any:
        return getattr(self.path, "stats", None)

    @property
    def next_half(self) -> int:
        """Buffer half the next op uses (each dispatch and each combine flips)."""
        return self.num_ops % 2

    @staticmethod
    def get_ep_buffer_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of the fast path's symmetric buffer for ``(T, H, R, E)``: an upper bound for BF16
        and FP8 and both halves (``mooncake.ep.layout``). Raises ValueError on a violated limit."""
        return ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    get_buffer_size_hint = get_ep_buffer_size_hint

    # ------------------------------------------------------------------ validation

    def _reject(
        self, op: str, exc: BaseException, x: Any, active_ranks: Any, timeout_us: Any
    ) -> None:
        """A local check failed: let the path tell the other ranks (the portable path does, in the
        op's first exchange, so that every rank raises before anything is sent)."""
        reject = getattr(self._path, "reject", None)
        if reject is None:
            return
        hint = next((t.device for t in (x, active_ranks) if isinstance(t, torch.Tensor)), None)
        reject(op, exc, hint, timeout_us)

    @staticmethod
    def _remember_valid(
        cache: dict[tuple, Validated], key: Optional[tuple], x: Any, run: Callable[..., Any]
    ) -> Validated:
        """After a full validation: (whether the expert ids still need a per-call value check,
        ``run``), remembered under the argument signature ``key`` (None: not cacheable)."""
        # Expert ids are checked per call where that is free (on the host); the portable path
        # checks CUDA inputs itself, the fast path ignores ids outside [0, E).
        validated = (x.device.type == "cpu", run)
        if key is not None:
            if len(cache) >= _MAX_SIGNATURES:
                cache.clear()
            cache[key] = validated
        return validated

    @staticmethod
    def _dispatch_runner(path: Any, num_ranks: int, *signature: Any) -> Callable[..., Any]:
        """The path's dispatch specialised on a validated signature ``(x, topk_idx, active_ranks,
        T, E, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook, stats)`` (the
        tensors are only looked at): ``run(x, topk_idx, active_ranks, timeout_us, stats)``, the
        path's ``dispatch_runner`` where it has one, else its ``dispatch`` with the signature's
        scalars bound. An ``active_ranks`` longer than ``R`` reaches the path as its first ``R``
        entries (a view: the op's writes land in the caller's tensor), unless the path reads only
        those anyway (``reads_active_prefix``: the kernels take its address)."""
        make = getattr(path, "dispatch_runner", None)
        run: Callable[..., Any]
        if make is not None:
            run = make(*signature)
        else:
            _, _, _, T, E, use_fp8, round_scale, use_ue8m0, async_finish, hook, _ = signature
            dispatch = path.dispatch

            def run_dispatch(x: Any, topk: Any, active: Any, timeout_us: int, stats: Any) -> Any:
                return dispatch(
                    x, topk, active, T, E, timeout_us, use_fp8, round_scale, use_ue8m0,
                    async_finish, hook, stats,
                )  # fmt: skip

            run = run_dispatch
        if signature[2].shape[0] == num_ranks or getattr(path, "reads_active_prefix", False):
            return run
        whole = run

        def run_prefix(x: Any, topk_idx: Any, active: Any, timeout_us: int, stats: Any) -> Any:
            return whole(x, topk_idx, active[:num_ranks], timeout_us, stats)

        return run_prefix

    @staticmethod
    def _combine_runner(path: Any, num_ranks: int, *signature: Any) -> Callable[..., Any]:
        """As ``_dispatch_runner``, for ``(x, topk_idx, topk_weights, active_ranks, handle,
        zero_copy, async_finish, return_recv_hook, out)``: ``run(x, topk_idx, topk_weights,
        active_ranks, timeout_us, handle, out)``."""
        make = getattr(path, "combine_runner", None)
        run: Callable[..., Any]
        if make is not None:
            run = make(*signature)
        else:
            _, _, _, _, _, zero_copy, async_finish, hook, _ = signature
            combine = path.combine

            def run_combine(
                x: Any, topk: Any, weights: Any, active: Any, timeout_us: int, handle: Any, out: Any
            ) -> Any:
                return combine(
                    x, topk, weights, active, timeout_us, handle, zero_copy, async_finish, hook,
                    out,
                )  # fmt: skip

            run = run_combine
        if signature[3].shape[0] == num_ranks or getattr(path, "reads_active_prefix", False):
            return run
        whole = run

        def run_prefix(
            x: Any, topk: Any, weights: Any, active: Any, timeout_us: int, handle: Any, out: Any
        ) -> Any:
            return whole(x, topk, weights, active[:num_ranks], timeout_us, handle, out)

        return run_prefix

    # ------------------------------------------------------------------ ops

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        active_ranks: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        timeout_us: int,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
    ) -> DispatchResult:
        """Send each token to the ranks owning its selected experts; receive this rank's tokens.

        Args:
            x: bf16 ``[N, H]``, contiguous.
            topk_idx: int64 ``[N, K]``, contiguous; ``-1`` = no expert; no expert twice in a row.
            active_ranks: int32 ``[R]`` on ``x``'s device; 1 alive, 0 failed. Input and output:
                a rank that is 0 on entry is neither sent to nor waited for; a rank that fails or
                sends nothing within ``timeout_us`` is set to 0 and its tokens are dropped. Never
                set back to 1. A longer tensor is accepted (SGLang passes ``max_ep_size`` slots):
                its first ``R`` entries are read and written, the rest is never touched.
            num_max_dispatch_tokens_per_rank: ``T`` (1..1024), the same on every rank.
            num_experts: ``E``, a multiple of ``R``.
            timeout_us: deadline in microseconds from the op's start; ``-1`` waits forever.
            use_fp8: send FP8 (per token and 128 channels, see ``mooncake.ep.fp8``); else BF16.
            round_scale: round FP8 scales up to powers of two (requires ``use_fp8``).
            use_ue8m0: send scales as UE8M0 exponent bytes (requires ``round_scale``).
            async_finish: return at once; ``event.current_stream_wait()`` completes the op.
            return_recv_hook: launch only the send phase; calling ``hook()`` runs the receive phase.
                Cannot be combined with ``async_finish``.
            cumulative_local_expert_recv_stats: int32 ``[L]``; received counts are added to it.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``:

            - ``recv_x``: bf16 ``[L, R*T, H]`` contiguous; with ``use_fp8`` a tuple
              ``(data float8_e4m3fn [L, R*T, H], scales)``: scales float32 ``[L, R*T, H/128]`` whose
              last two dims are column-major (a transposed ``[L, H/128, R*T]`` allocation), or with
              ``use_ue8m0`` int32 ``[L, R*T, ceil(H/512)]`` (four exponent bytes per int, little
              endian, same column-major layout).
            - ``recv_count``: int32 ``[L]``; rows ``[0, recv_count[l])`` of expert ``l`` are valid.
            - ``handle``: ``(src_info int32 [L, R*T], layout_range int64 [L, R], T, H, E)``;
              ``src_info`` = each row's token index on its source, ``layout_range[l, r] =
              (begin << 32) | count``: rows ``[begin, begin+count)`` of expert ``l`` came from rank
              ``r`` (rows are grouped by source, in source order).
            - ``event``: ``EventOverlap``; ``hook``: callable with ``return_recv_hook``, else None.

        Raises:
            TypeError/ValueError: a bad argument or violated limit, before anything is sent. On the
                portable path the other ranks raise too (``PeerArgumentError``, a ValueError naming
                the rank and the limit), in the op's first exchange, before any row is sent.
        """
        path = self._path
        if path is None:
            raise RuntimeError("this Buffer was destroyed")
        stats = cumulative_local_expert_recv_stats
        T, E = num_max_dispatch_tokens_per_rank, num_experts
        with _no_torch_function():  # see _no_torch_function: no Python per tensor attribute
            try:  # the argument signature; anything odd (not a tensor, ...) takes the full checks
                key: Optional[tuple] = (
                    x.__class__, x.dtype, x.shape, x.device, x.is_contiguous(),
                    topk_idx.__class__, topk_idx.dtype, topk_idx.shape, topk_idx.device,
                    topk_idx.is_contiguous(),
                    active_ranks.__class__, active_ranks.dtype, active_ranks.shape,
                    active_ranks.device, active_ranks.is_contiguous(),
                    T.__class__, T, E.__class__, E,
                    use_fp8.__class__, use_fp8, round_scale.__class__, round_scale,
                    use_ue8m0.__class__, use_ue8m0, async_finish.__class__, async_finish,
                    return_recv_hook.__class__, return_recv_hook,
                    None if stats is None else (
                        stats.__class__, stats.dtype, stats.shape, stats.device,
                        stats.is_contiguous(),
                    ),
                )  # fmt: skip
                valid = self._dispatch_ok.get(key)  # type: ignore[arg-type]
            except Exception:
                key, valid = None, None
            try:
                if (
                    valid is None
                    or timeout_us.__class__ is not int
                    or not -1 <= timeout_us <= MAX_TIMEOUT_US
                ):
                    validate_dispatch(
                        self.num_ranks, x, topk_idx, active_ranks, T, E, timeout_us, use_fp8,
                        round_scale, use_ue8m0, async_finish, return_recv_hook, stats,
                    )  # fmt: skip
                    run = self._dispatch_runner(
                        path, self.num_ranks, x, topk_idx, active_ranks, T, E, use_fp8,
                        round_scale, use_ue8m0, async_finish, return_recv_hook, stats,
                    )  # fmt: skip
                    valid = self._remember_valid(self._dispatch_ok, key, x, run)
                if valid[0]:
                    check_topk_values(topk_idx, E)
            except (TypeError, ValueError) as exc:
                self._reject("dispatch", exc, x, active_ranks, timeout_us)
                raise
            result = valid[1](x, topk_idx, active_ranks, timeout_us, stats)
        self.num_ops += 1
        return result  # type: ignore[no-any-return]

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        active_ranks: torch.Tensor,
        timeout_us: int,
        handle: tuple,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> CombineResult:
        """Send expert outputs back to the tokens' ranks and reduce them there.

        Args:
            x: bf16 ``[L, R*T, H]``: expert outputs in the dispatch layout (row ``i`` of expert
                ``l`` answers row ``i`` of the dispatch's ``recv_x``). Ignored with ``zero_copy``.
            topk_idx: int64 ``[N, K]``, this rank's routing (the one passed to the dispatch).
            topk_weights: float32 ``[N, K]``.
            active_ranks: int32 ``[R]``, as in ``dispatch``; an expert whose owner is 0 (on entry or
                after failing in this op) contributes nothing.
            timeout_us: as in ``dispatch``.
            handle: the dispatch's handle.
            zero_copy: the expert outputs were written into ``get_next_combine_buffer(handle)``.
            async_finish, return_recv_hook: as in ``dispatch``.
            out: bf16 ``[N, H]`` written in place and returned, when given.

        Returns:
            ``(combined_x, event, hook)``: ``combined_x`` bf16 ``[N, H]`` =
            ``sum over k with topk_idx[n,k] >= 0 and owner alive of topk_weights[n,k] *
            expert_out``,
            accumulated in fp32 in increasing ``k`` (weights not renormalised).

        Raises:
            TypeError/ValueError: as in ``dispatch``.
        """
        path = self._path
        if path is None:
            raise RuntimeError("this Buffer was destroyed")
        with _no_torch_function():  # see _no_torch_function
            try:
                src_info, layout_range, T, H, E = handle
                key: Optional[tuple] = (
                    x.__class__, x.dtype, x.shape, x.device, x.is_contiguous(),
                    topk_idx.__class__, topk_idx.dtype, topk_idx.shape, topk_idx.device,
                    topk_idx.is_contiguous(),
                    topk_weights.__class__, topk_weights.dtype, topk_weights.shape,
                    topk_weights.device, topk_weights.is_contiguous(),
                    active_ranks.__class__, active_ranks.dtype, active_ranks.shape,
                    active_ranks.device, active_ranks.is_contiguous(),
                    handle.__class__,
                    src_info.__class__, src_info.dtype, src_info.shape, src_info.device,
                    src_info.is_contiguous(),
                    layout_range.__class__, layout_range.dtype, layout_range.shape,
                    layout_range.device, layout_range.is_contiguous(),
                    T.__class__, T, H.__class__, H, E.__class__, E,
                    zero_copy.__class__, zero_copy, async_finish.__class__, async_finish,
                    return_recv_hook.__class__, return_recv_hook,
                    None if out is None else (
                        out.__class__, out.dtype, out.shape, out.device, out.is_contiguous()
                    ),
                )  # fmt: skip
                valid = self._combine_ok.get(key)  # type: ignore[arg-type]
            except Exception:
                key, valid = None, None
            try:
                if (
                    valid is None
                    or timeout_us.__class__ is not int
                    or not -1 <= timeout_us <= MAX_TIMEOUT_US
                ):
                    validate_combine(
                        self.num_ranks, x, topk_idx, topk_weights, active_ranks, timeout_us,
                        handle, zero_copy, async_finish, return_recv_hook, out,
                    )  # fmt: skip
                    run = self._combine_runner(
                        path, self.num_ranks, x, topk_idx, topk_weights, active_ranks, handle,
                        zero_copy, async_finish, return_recv_hook, out,
                    )  # fmt: skip
                    valid = self._remember_valid(self._combine_ok, key, x, run)
                if valid[0]:
                    check_topk_values(topk_idx, handle[4])
            except (TypeError, ValueError) as exc:
                self._reject("combine", exc, x, active_ranks, timeout_us)
                raise
            result = valid[1](x, topk_idx, topk_weights, active_ranks, timeout_us, handle, out)
        self.num_ops += 1
        return result  # type: ignore[no-any-return]

    def get_next_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """bf16 ``[L, R*T, H]`` view for ``combine(..., zero_copy=True)`` issued as the next op."""
        with _no_torch_function():
            validate_handle(self.num_ranks, handle)
            return self.path.get_next_combine_buffer(handle)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ membership and lifetime

    def update_ep_member(self) -> None:
        """Collective: after the backend recovered or extended ranks, re-exchange peer metadata.

        Survivors call this; a replacement process constructs a new ``Buffer`` instead. Both run the
        same collective sequence: the path selection (the fast path's exchange of IPC handles and
        endpoints), then the path agreement. Afterwards every rank counts ops from 0 again (buffer
        half 0), as a new ``Buffer`` does. Reset ``active_ranks`` to ones afterwards: ops never set
        entries back to 1.

        A replacement may also be a second ``Buffer`` constructed in a surviving process (Mooncake's
        ``test_mooncake_ep.py`` does that on one rank while the others update): the sequences match
        in every case, including a fast path that can no longer be used on some rank (the updating
        ranks then fall back to the portable path, as the constructor's selection does).
        """
        path = self.path
        self.num_ranks = self.group.size()
        self._dispatch_ok.clear()  # the expected active_ranks shape follows the group size
        self._combine_ok.clear()
        if path.name == PortablePath.name:
            # A replacement's constructor runs the fast path's selection (collective); so do we, so
            # that both sides issue the same collectives, and we switch if the fast path works now.
            candidate = select_path(self.group, self.num_ep_buffer_bytes, self._requested)
            if candidate.name == PortablePath.name:
                path.update_ep_member()
                path.reason = candidate.reason
                candidate.destroy()
            else:
                path.destroy()
                path = candidate
        else:
            try:  # the fast path runs the same collectives as its selection
                path.update_ep_member()
            except PathReplaced as exc:  # another transport now (set up by the same collectives)
                path.destroy()
                path = exc.path
            except PathUnavailable as exc:  # same verdict on every rank; a new Buffer falls back
                path.destroy()
                path = PortablePath(self.group, f"the fast path cannot continue: {exc}")
        self._path = path  # so that destroy() releases it even if the agreement raises
        self._path = agree_on_path(self.group, path, forced=self._requested == "fast")
        self.num_ops = 0  # as in a new Buffer: every rank starts again at half 0 (so do the paths)

    def destroy(self) -> None:
        """Release the path's resources: local (no collective), idempotent, bounded: it waits
        for nothing but this rank's own GPU work and, in proxy mode, up to 1 s for the proxy to
        drain."""
        self._dispatch_ok.clear()  # the specialised ops hold the path
        self._combine_ok.clear()
        path, self._path = self._path, None
        if path is not None:
            path.destroy()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.destroy()

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = f"path={self._path.name!r}" if self._path is not None else "destroyed"
        return f"Buffer(rank={self.rank}, num_ranks={self.num_ranks}, {state})"
