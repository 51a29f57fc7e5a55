"""``Buffer``: the low-latency expert-parallel API with fault tolerance (EP_CONTRACT.md).

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
from .limits import (
    MAX_TIMEOUT_US,
    Limit,
    check_bool,
    check_experts,
    check_hidden,
    check_int,
    check_tensor,
    check_timeout_us,
    check_tokens_per_rank,
    check_topk,
    check_topk_values,
    tag_limit,
)
from .path import EPPath, agree_on_path, requested_path, select_path
from .portable_path import PortablePath

logger = logging.getLogger("mooncake.ep")

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
        rank, num_ranks: this rank's index and ``R``.
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

    def _check_active_ranks(self, active_ranks: Any, device: torch.device) -> None:
        check_tensor("active_ranks", active_ranks, torch.int32, (self.num_ranks,), device)

    def _check_flags(self, async_finish: Any, return_recv_hook: Any) -> None:
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
    def _dispatch_runner(path: Any, *signature: Any) -> Callable[..., DispatchResult]:
        """The path's dispatch specialised on a validated signature ``(x, topk_idx, active_ranks,
        T, E, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook, stats)`` (the
        tensors are only looked at): the path's ``dispatch_runner`` where it has one, else its
        ``dispatch`` with the signature's scalars bound."""
        make = getattr(path, "dispatch_runner", None)
        if make is not None:
            return make(*signature)  # type: ignore[no-any-return]
        _, _, _, T, E, use_fp8, round_scale, use_ue8m0, async_finish, hook, _ = signature
        dispatch = path.dispatch

        def run(x: Any, topk_idx: Any, active_ranks: Any, timeout_us: int, stats: Any) -> Any:
            return dispatch(
                x, topk_idx, active_ranks, T, E, timeout_us, use_fp8, round_scale, use_ue8m0,
                async_finish, hook, stats,
            )  # fmt: skip

        return run

    @staticmethod
    def _combine_runner(path: Any, *signature: Any) -> Callable[..., CombineResult]:
        """As ``_dispatch_runner``, for ``(x, topk_idx, topk_weights, active_ranks, handle,
        zero_copy, async_finish, return_recv_hook, out)``."""
        make = getattr(path, "combine_runner", None)
        if make is not None:
            return make(*signature)  # type: ignore[no-any-return]
        _, _, _, _, _, zero_copy, async_finish, hook, _ = signature
        combine = path.combine

        def run(
            x: Any, topk_idx: Any, weights: Any, active: Any, timeout_us: int, handle: Any, out: Any
        ) -> Any:
            return combine(
                x, topk_idx, weights, active, timeout_us, handle, zero_copy, async_finish, hook,
                out,
            )  # fmt: skip

        return run

    def _validate_dispatch(
        self,
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
        check_experts(num_experts, self.num_ranks)
        check_tensor("topk_idx", topk_idx, torch.int64, (num_tokens, None), x.device)
        check_topk(topk_idx.shape[1])
        self._check_active_ranks(active_ranks, x.device)
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
                ValueError(
                    "use_ue8m0=True requires round_scale=True (UE8M0 scales are powers of two)"
                ),
                Limit.FLAGS,
            )
        self._check_flags(async_finish, return_recv_hook)
        if stats is not None:
            check_tensor(
                "cumulative_local_expert_recv_stats",
                stats,
                torch.int32,
                (num_experts // self.num_ranks,),
                x.device,
            )

    def _validate_handle(self, handle: Any) -> tuple[int, int, int]:
        if not isinstance(handle, (tuple, list)) or len(handle) != 5:
            raise TypeError(
                "handle must be the 5-tuple (src_info, layout_range, T, H, E) returned by dispatch"
            )
        src_info, layout_range, tokens, hidden, num_experts = handle
        check_tokens_per_rank(tokens, "handle[2] (T)")
        check_hidden(hidden, "handle[3] (H)")
        check_experts(num_experts, self.num_ranks, "handle[4] (E)")
        num_local = num_experts // self.num_ranks
        check_tensor(
            "handle[0] (src_info)", src_info, torch.int32, (num_local, self.num_ranks * tokens)
        )
        check_tensor(
            "handle[1] (layout_range)",
            layout_range,
            torch.int64,
            (num_local, self.num_ranks),
            src_info.device,
        )
        return tokens, hidden, num_experts

    def _validate_combine(
        self,
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
        tokens, hidden, num_experts = self._validate_handle(handle)
        num_local = num_experts // self.num_ranks
        check_tensor("x", x, torch.bfloat16, (num_local, self.num_ranks * tokens, hidden))
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
        self._check_active_ranks(active_ranks, device)
        check_timeout_us(timeout_us)
        check_bool("zero_copy", zero_copy)
        self._check_flags(async_finish, return_recv_hook)
        if out is not None:
            check_tensor("out", out, torch.bfloat16, (num_tokens, hidden), device)

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
                set back to 1.
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
                    stats.__class__, stats.dtype, stats.shape, stats.device, stats.is_contiguous()
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
                self._validate_dispatch(
                    x, topk_idx, active_ranks, T, E, timeout_us, use_fp8, round_scale, use_ue8m0,
                    async_finish, return_recv_hook, stats,
                )  # fmt: skip
                run = self._dispatch_runner(
                    path, x, topk_idx, active_ranks, T, E, use_fp8, round_scale, use_ue8m0,
                    async_finish, return_recv_hook, stats,
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
                self._validate_combine(
                    x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy,
                    async_finish, return_recv_hook, out,
                )  # fmt: skip
                run = self._combine_runner(
                    path, x, topk_idx, topk_weights, active_ranks, handle, zero_copy,
                    async_finish, return_recv_hook, out,
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
        self._validate_handle(handle)
        return self.path.get_next_combine_buffer(handle)

    # ------------------------------------------------------------------ membership and lifetime

    def update_ep_member(self) -> None:
        """Collective: after the backend recovered or extended ranks, re-exchange peer metadata.

        Survivors call this; a replacement process constructs a new ``Buffer`` instead. Both run the
        same collective sequence: the path selection (the fast path's exchange of IPC handles and
        endpoints), then the path agreement. Afterwards every rank counts ops from 0 again (buffer
        half 0), as a new ``Buffer`` does. Reset ``active_ranks`` to ones afterwards: ops never set
        entries back to 1.
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
            path.update_ep_member()  # the fast path runs the same collectives as its selection
        self._path = path  # so that destroy() releases it even if the agreement raises
        self._path = agree_on_path(self.group, path, forced=self._requested == "fast")
        self.num_ops = 0  # as in a new Buffer: every rank starts again at half 0 (so do the paths)

    def destroy(self) -> None:
        """Release the path's resources: local (no collective), idempotent, never blocks."""
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
