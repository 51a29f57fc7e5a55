"""The portable path: dispatch and combine in torch over the group's own collectives.

Works with any ``torch.distributed`` backend (``mooncake-cpu`` for CPU tensors, ``mooncake``, gloo,
NCCL), on CPU or CUDA tensors. Each op moves only routed bytes, in two collectives:

1. ``all_to_all_single`` of a count message per peer (``COUNT_MESSAGE_BYTES``): a header that every
   rank checks (op kind, T, H, E, K, FP8 flags must agree) and the number of rows that follow. A
   rank whose arguments failed its local checks sends an error message instead (``ERROR_MAGIC``,
   the ``Limit`` and the offending value) and raises its own error; every other rank raises
   ``PeerArgumentError`` (a ValueError) after this exchange, so no rank sends rows or waits;
2. ``all_to_all_single`` of the rows themselves, with exact split sizes.

Dispatch sends one record per (token, destination rank) (the payload once, with the list of the
destination's experts it selected; see ``routing_plan``); FP8 is cast on the sender, the receiver
lays rows out per expert. Combine sends one BF16 row per (token, expert) back; the source reduces
them in fp32 in increasing ``k`` order, so results are bit-reproducible.

Fault rules (with the Mooncake backend; gloo and NCCL have none): every collective runs under
``pg.op_timeout`` with what is left of ``timeout_us`` (measured from the op's start); afterwards
every rank that ``pg.get_active_ranks`` reports failed gets ``active_ranks[r] = 0`` and whatever it
sent in this op is dropped (its slots were zero-filled by the backend; EP never reads them). Ranks
already 0 on entry get nothing and contribute nothing. Entries are never set back to 1.

Send and receive phases: the send phase (plan, pack, count exchange, issue the row exchange) runs in
the call; the receive phase (wait for the rows, unpack or reduce) runs in the call, or in ``hook()``
(``return_recv_hook``), or in ``event.current_stream_wait()`` (``async_finish``). Outputs are
allocated in the send phase and filled in place by the receive phase. The count exchange needs the
counts on the host, so this path synchronises with the host and cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .event import EventOverlap
from .faults import fault_point
from .fp8 import num_scale_groups, num_ue8m0_ints
from .limits import Limit, PeerArgumentError, check_topk_values, limit_of
from .membership import BackendMembership, collective_devices
from .records import (
    RecordFormat,
    gather_combine_rows,
    pack_dispatch_records,
    reduce_combine_rows,
    unpack_dispatch_records,
)
from .routing_plan import plan_combine_recv, plan_combine_send, plan_dispatch_send
from .stats import TrafficStats

logger = logging.getLogger("mooncake.ep")

MAGIC = 0x4D43455050  # "MCEPP": a zero-filled slot (failed peer) never carries it
ERROR_MAGIC = 0x4D43455045  # "MCEPE": the sender rejected its arguments (kind, limit, value)
NO_VALUE = -(1 << 63)  # error message without an offending value
KIND_NAMES = {1: "dispatch", 2: "combine"}
KIND_DISPATCH = 1
KIND_COMBINE = 2
HEADER_FIELDS = (
    "magic",
    "kind",
    "tokens_per_rank",
    "hidden",
    "num_experts",
    "topk",
    "flags",
    "rows",
)
COUNT_MESSAGE_BYTES = 8 * len(HEADER_FIELDS)
MIN_DEADLINE_S = 1e-3  # what an op gets for its next collective once its timeout_us is spent
WAIT_GRACE_S = 5.0  # non fault-tolerant backends: extra wait before declaring the backend stuck
REJECT_TIMEOUT_US = 60_000_000  # deadline of an error message when the op's timeout_us is invalid


class EPCommError(RuntimeError):
    """A non fault-tolerant backend failed or missed the op's deadline (gloo, NCCL)."""


class _OpClock:
    """``timeout_us`` measured from the op's start."""

    def __init__(self, timeout_us: int) -> None:
        self.start = time.monotonic()
        self.timeout_us = timeout_us

    def remaining_s(self) -> Optional[float]:
        if self.timeout_us < 0:
            return None
        return max(MIN_DEADLINE_S, self.timeout_us / 1e6 - (time.monotonic() - self.start))


class _ReceivePhase:
    """Runs the receive phase at most once (from the call, ``hook()`` or the event)."""

    def __init__(self, run: Callable[[], None]) -> None:
        self._run: Optional[Callable[[], None]] = run

    def __call__(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run()


class PortablePath:
    """``EPPath`` over ``torch.distributed`` collectives. Attributes: ``name = "portable"``,
    ``reason`` (why it was chosen), ``stats`` (``TrafficStats``), ``num_ops`` (ops issued; the
    buffer half of the next op is ``num_ops % 2``)."""

    name = "portable"

    def __init__(self, group: Any, reason: str = "selected") -> None:
        self.group = group
        self.reason = reason
        self.rank = group.rank()
        self.num_ranks = group.size()
        self.membership = BackendMembership(group, self.num_ranks)
        self.stats = TrafficStats()
        self.num_ops = 0
        self._devices = collective_devices(group)
        self._combine_stage: list[Optional[torch.Tensor]] = [None, None]
        self._destroyed = False

    # ------------------------------------------------------------------ plumbing

    def _comm_device(self, device: torch.device) -> torch.device:
        if device.type in self._devices:
            return device
        if "cpu" in self._devices:
            return torch.device("cpu")
        raise ValueError(
            f"x is on {device} but this group's backend ({sorted(self._devices)}) cannot move "
            f"{device.type} "
            f"tensors and has no CPU backend to stage through"
        )

    def _exchange(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        clock: _OpClock,
    ) -> Any:
        with self.membership.deadline(clock.remaining_s()):
            return dist.all_to_all_single(
                out, inp, out_splits, in_splits, group=self.group, async_op=True
            )

    def _wait(self, work: Any, clock: _OpClock, what: str) -> None:
        if self.membership.fault_tolerant:
            work.wait()  # the backend enforces the op's deadline and completes among survivors
            return
        remaining = clock.remaining_s()
        try:
            if remaining is None:
                work.wait()
            else:
                work.wait(timedelta(seconds=remaining + WAIT_GRACE_S))
        except Exception as exc:
            raise EPCommError(
                f"{what} failed on a backend without fault tolerance ({exc}); use the Mooncake "
                "backend "
                f"to survive peer failures"
            ) from exc

    def _exchange_counts(
        self,
        header: list[int],
        rows_per_dest: torch.Tensor,
        active_entry: torch.Tensor,
        clock: _OpClock,
        comm: torch.device,
    ) -> tuple[list[int], torch.Tensor, set[int]]:
        """Count exchange. Returns (rows to receive per source, sources whose rows will be usable,
        ranks found failed). Raises ValueError on every rank if the ranks' op parameters disagree.
        """
        num_ranks = self.num_ranks
        message = torch.tensor(header, dtype=torch.int64, device="cpu").repeat(num_ranks, 1)
        message[:, -1] = rows_per_dest
        received = torch.empty_like(message)
        if comm.type != "cpu":
            message, received = message.to(comm), received.to(comm)
        work = self._exchange(received, message, [1] * num_ranks, [1] * num_ranks, clock)
        self._wait(work, clock, "count exchange")
        received = received.cpu()
        errors = (received[:, 0] == ERROR_MAGIC).nonzero().flatten().tolist()
        if errors:  # a rank rejected its arguments: nobody sends anything
            _, _, limit, value = received[errors[0], :4].tolist()
            raise PeerArgumentError(
                KIND_NAMES.get(header[1], "op"),
                errors,
                Limit(limit) if limit in Limit._value2member_map_ else Limit.ARGUMENT,
                None if value == NO_VALUE else value,
            )
        alive = self.membership.alive()
        has_magic = received[:, 0] == MAGIC
        failed = {
            r
            for r in range(num_ranks)
            if active_entry[r] and (not bool(has_magic[r]) or (alive is not None and not alive[r]))
        }
        mine = torch.tensor(header[1:-1], dtype=torch.int64, device="cpu")
        mismatched = [
            r
            for r in range(num_ranks)
            if bool(has_magic[r]) and not torch.equal(received[r, 1:-1], mine)
        ]
        if mismatched:
            theirs = received[mismatched[0], 1:-1].tolist()
            names = HEADER_FIELDS[1:-1]
            raise ValueError(
                f"ranks disagree on the op's parameters: rank {self.rank} has "
                f"{dict(zip(names, header[1:-1]))}, rank {mismatched[0]} has "
                f"{dict(zip(names, theirs))} "
                f"(all ranks must issue the same sequence of ops with the same T, H, E, K and FP8 "
                "flags)"
            )
        rows_in = torch.where(has_magic, received[:, -1], torch.zeros_like(received[:, -1]))
        usable = has_magic & active_entry
        for r in failed:
            usable[r] = False
        return [int(v) for v in rows_in.tolist()], usable, failed

    def _after_exchange_failures(self, usable: torch.Tensor, failed: set[int]) -> None:
        alive = self.membership.alive()
        if alive is not None:
            for r in range(self.num_ranks):
                if not alive[r] and bool(usable[r]):
                    usable[r] = False
                    failed.add(r)

    def _mark_failed(
        self, active_ranks: torch.Tensor, active_entry: torch.Tensor, failed: set[int]
    ) -> None:
        newly = sorted(r for r in failed if bool(active_entry[r]))
        if newly:
            logger.warning(
                "rank %d: ranks %s failed during the op; marking them inactive", self.rank, newly
            )
            active_ranks[torch.tensor(newly, dtype=torch.int64, device=active_ranks.device)] = 0

    def _check_usable(self) -> None:
        if self._destroyed:
            raise RuntimeError("this EP buffer was destroyed")

    def reject(
        self, op: str, exc: BaseException, device: Optional[torch.device], timeout_us: Any
    ) -> None:
        """This rank's ``op`` arguments failed a check (``exc``, raised by the caller afterwards):
        take part in the op's count exchange with an error message instead of counts, so that the
        other ranks raise ``PeerArgumentError`` instead of sending rows and waiting for ours."""
        if self._destroyed:
            return
        limit, value = limit_of(exc)
        if value is None or not -(1 << 62) < value < (1 << 62):
            value = NO_VALUE
        kind = KIND_DISPATCH if op == "dispatch" else KIND_COMBINE
        valid_timeout = timeout_us.__class__ is int and timeout_us >= -1
        clock = _OpClock(timeout_us if valid_timeout else REJECT_TIMEOUT_US)
        try:
            comm = self._comm_device(device if device is not None else torch.device("cpu"))
        except ValueError:
            comm = torch.device("cpu") if "cpu" in self._devices else torch.device("cuda")
        header = [ERROR_MAGIC, kind, int(limit), value, 0, 0, 0, 0]
        try:
            no_rows = torch.zeros(self.num_ranks, dtype=torch.int64, device="cpu")
            everyone = torch.ones(self.num_ranks, dtype=torch.bool, device="cpu")
            self._exchange_counts(header, no_rows, everyone, clock, comm)
        except PeerArgumentError:
            pass  # others rejected theirs too; this rank raises its own error
        except Exception as comm_exc:  # the caller raises the argument error regardless
            logger.warning(
                "rank %d: could not tell the other ranks that its %s arguments were rejected: %s",
                self.rank,
                op,
                comm_exc,
            )

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
        self._check_usable()
        clock = _OpClock(timeout_us)
        fault_point("dispatch.start")
        num_ranks, tokens = self.num_ranks, num_max_dispatch_tokens_per_rank
        num_local = num_experts // num_ranks
        hidden = x.shape[1]
        topk = topk_idx.shape[1]
        device = x.device
        try:
            comm = self._comm_device(device)
            topk_cpu = topk_idx.cpu()
            if topk_idx.device.type != "cpu":  # Buffer checked CPU inputs already
                check_topk_values(topk_cpu, num_experts)
        except (TypeError, ValueError) as exc:
            self.reject("dispatch", exc, device, timeout_us)
            raise
        active_entry = active_ranks.cpu() != 0
        fmt = RecordFormat.make(hidden, topk, num_local, use_fp8, use_ue8m0)
        plan = plan_dispatch_send(topk_cpu, num_local, num_ranks, active_entry, fmt.expert_dtype)
        send = pack_dispatch_records(x.to(comm), fmt, round_scale, plan)

        # Outputs, filled in place by the receive phase.
        rows = num_ranks * tokens
        groups = num_scale_groups(hidden)
        scales: Optional[torch.Tensor] = None
        if use_fp8:
            data = torch.empty((num_local, rows, hidden), dtype=torch.float8_e4m3fn, device=device)
            if use_ue8m0:
                scales = torch.empty(
                    (num_local, num_ue8m0_ints(hidden), rows), dtype=torch.int32, device=device
                )
            else:
                scales = torch.empty((num_local, groups, rows), dtype=torch.float32, device=device)
            recv_x: Any = (data, scales.transpose(1, 2))
        else:
            data = torch.empty((num_local, rows, hidden), dtype=torch.bfloat16, device=device)
            recv_x = data
        recv_count = torch.zeros(num_local, dtype=torch.int32, device=device)
        src_info = torch.full((num_local, rows), -1, dtype=torch.int32, device=device)
        layout_range = torch.zeros((num_local, num_ranks), dtype=torch.int64, device=device)
        handle = (src_info, layout_range, tokens, hidden, num_experts)

        flags = int(use_fp8) | int(round_scale) << 1 | int(use_ue8m0) << 2
        header = [MAGIC, KIND_DISPATCH, tokens, hidden, num_experts, topk, flags, 0]
        rows_in, usable, failed = self._exchange_counts(
            header, plan.records_per_dest, active_entry, clock, comm
        )
        fault_point("dispatch.after_counts")

        in_splits = [int(v) for v in plan.records_per_dest.tolist()]
        received = torch.empty((sum(rows_in), fmt.record_bytes), dtype=torch.uint8, device=comm)
        work = self._exchange(received, send, rows_in, in_splits, clock)
        self._count_dispatch(fmt, plan, in_splits)
        self.num_ops += 1
        fault_point("dispatch.after_send")

        def receive() -> None:
            self._wait(work, clock, "dispatch")
            self._after_exchange_failures(usable, failed)
            rp = unpack_dispatch_records(
                received, rows_in, usable, fmt, data, scales, tokens, num_local, num_ranks
            )
            recv_count.copy_(rp.recv_count.to(torch.int32))
            layout_range.copy_(rp.layout_range)
            flat = (rp.local_expert * rows + rp.row).to(device)
            src_info.view(-1)[flat] = rp.token.to(device=device, dtype=torch.int32)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)
            self._mark_failed(active_ranks, active_entry, failed)

        return self._finish_or_defer(
            receive, async_finish, return_recv_hook, recv_x, recv_count, handle
        )

    def _finish_or_defer(
        self, receive: Callable[[], None], async_finish: bool, return_recv_hook: bool, *results: Any
    ):
        phase = _ReceivePhase(receive)
        if return_recv_hook:
            return (*results, EventOverlap(), phase)
        if async_finish:
            return (*results, EventOverlap(on_wait=phase), None)
        phase()
        return (*results, EventOverlap(), None)

    def _count_dispatch(self, fmt: RecordFormat, plan: Any, in_splits: list[int]) -> None:
        stats = self.stats
        remote_records = sum(in_splits) - in_splits[self.rank]
        stats.dispatch_ops += 1
        stats.dispatch_payload_bytes += remote_records * fmt.payload_bytes
        stats.dispatch_meta_bytes += remote_records * fmt.meta_bytes + COUNT_MESSAGE_BYTES * (
            self.num_ranks - 1
        )
        stats.dispatch_local_bytes += in_splits[self.rank] * fmt.payload_bytes
        stats.dispatch_selections += int(plan.pairs_per_dest.sum())
        stats.dispatch_records += remote_records

    # ------------------------------------------------------------------ combine

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
        self._check_usable()
        clock = _OpClock(timeout_us)
        fault_point("combine.start")
        _, layout_range, tokens, hidden, num_experts = handle
        num_ranks = self.num_ranks
        num_local = num_experts // num_ranks
        num_tokens, topk = topk_idx.shape
        device = topk_idx.device
        try:
            if zero_copy:
                source = self._combine_stage[self.num_ops % 2]
                if (
                    source is None
                    or source.shape != (num_local, num_ranks * tokens, hidden)
                    or source.device != device
                ):
                    raise ValueError(
                        "zero_copy=True but get_next_combine_buffer(handle) was not called for "
                        "this combine (or was called before another op): write the expert outputs "
                        "into that buffer first"
                    )
            else:
                source = x
            comm = self._comm_device(device)
            topk_cpu = topk_idx.cpu()
            if topk_idx.device.type != "cpu":
                check_topk_values(topk_cpu, num_experts)
        except (TypeError, ValueError) as exc:
            self.reject("combine", exc, device, timeout_us)
            raise
        active_entry = active_ranks.cpu() != 0
        send_plan = plan_combine_send(layout_range.cpu(), active_entry, num_ranks, tokens)
        recv_plan = plan_combine_recv(topk_cpu, num_local, num_ranks, active_entry)
        send = gather_combine_rows(source, send_plan.rows).to(comm)

        header = [MAGIC, KIND_COMBINE, tokens, hidden, num_experts, 0, 0, 0]
        rows_in, usable, failed = self._exchange_counts(
            header, send_plan.rows_per_dest, active_entry, clock, comm
        )
        fault_point("combine.after_counts")
        in_splits = [int(v) for v in send_plan.rows_per_dest.tolist()]
        received = torch.empty((sum(rows_in), 2 * hidden), dtype=torch.uint8, device=comm)
        work = self._exchange(received, send, rows_in, in_splits, clock)
        self._count_combine(hidden, in_splits)
        self.num_ops += 1
        fault_point("combine.after_send")

        combined = (
            out
            if out is not None
            else torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=device)
        )
        weights = topk_weights

        def receive() -> None:
            self._wait(work, clock, "combine")
            self._after_exchange_failures(usable, failed)
            expected = recv_plan.expected_per_dest.tolist()
            for r in range(num_ranks):
                if bool(usable[r]) and rows_in[r] != expected[r]:
                    logger.warning(
                        "rank %d: combine got %d rows from rank %d, expected %d (topk_idx differs "
                        "from the "
                        "dispatch's, or the peer dropped this rank); ignoring that rank's rows",
                        self.rank,
                        rows_in[r],
                        r,
                        expected[r],
                    )
                    usable[r] = False
            reduce_combine_rows(
                received, rows_in, usable, recv_plan, weights, combined, topk, hidden
            )
            self._mark_failed(active_ranks, active_entry, failed)

        return self._finish_or_defer(receive, async_finish, return_recv_hook, combined)

    def _count_combine(self, hidden: int, in_splits: list[int]) -> None:
        stats = self.stats
        remote_rows = sum(in_splits) - in_splits[self.rank]
        stats.combine_ops += 1
        stats.combine_payload_bytes += remote_rows * 2 * hidden
        stats.combine_meta_bytes += COUNT_MESSAGE_BYTES * (self.num_ranks - 1)
        stats.combine_local_bytes += in_splits[self.rank] * 2 * hidden

    # ------------------------------------------------------------------ buffers and membership

    def get_next_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """bf16 ``[L, R*T, H]`` staging buffer read by the next op (``combine(zero_copy=True)``)."""
        self._check_usable()
        src_info, _, tokens, hidden, num_experts = handle
        shape = (num_experts // self.num_ranks, self.num_ranks * tokens, hidden)
        half = self.num_ops % 2
        stage = self._combine_stage[half]
        if stage is None or stage.shape != shape or stage.device != src_info.device:
            stage = torch.empty(shape, dtype=torch.bfloat16, device=src_info.device)
            self._combine_stage[half] = stage
        return stage

    def update_ep_member(self) -> None:
        """Nothing to re-exchange (peers are reached through the group); counts ops from 0 again,
        as a new path on a replacement does."""
        self._check_usable()
        self.num_ranks = self.group.size()
        self.membership = BackendMembership(self.group, self.num_ranks)
        self.num_ops = 0
        self._combine_stage = [None, None]

    def destroy(self) -> None:
        """Local and immediate: drops staging buffers; ops still in flight are abandoned."""
        self._destroyed = True
        self._combine_stage = [None, None]
