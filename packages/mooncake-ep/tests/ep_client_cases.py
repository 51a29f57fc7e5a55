"""Per-rank bodies of ``test_ep_clients.py``: what real clients (Mooncake's and DeepEP's tests,
SGLang's dispatcher and elastic-EP flow) rely on, in our own words.

Each body returns ``{"errors": [...]}`` (empty = pass) and keeps issuing the same ops on every rank
when a check fails, so the ranks stay in step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from ep_cases import check_combine, check_dispatch, make_inputs, simulated_gemm

CASE = {"name": "client", "T": 16, "H": 256, "K": 3, "use_fp8": False, "structured": True}
SLOW_OK_US = 10_000_000
FAULT_TIMEOUT_US = 1_000_000
SENTINEL = 7  # entries of a long active_ranks beyond R: never read or written by an op


def _case(world_size: int, **extra: Any) -> dict:
    return dict(CASE, E=2 * world_size, **extra)


def _round(
    buffer: Any, rank: int, world_size: int, case: dict, active: torch.Tensor, alive: list[bool]
) -> list[str]:
    """One dispatch + combine on ``Buffer`` with exact checks against the reference."""
    num_local = case["E"] // world_size
    x, topk_idx, weights = make_inputs(case, rank)
    result = buffer.dispatch(x, topk_idx, active, case["T"], case["E"], SLOW_OK_US, use_fp8=False)
    errors = check_dispatch(case, rank, world_size, result, alive, None)
    expert_out = simulated_gemm(result[0], False, rank, num_local)
    combined = buffer.combine(expert_out, topk_idx, weights, active, SLOW_OK_US, result[2])[0]
    return errors + check_combine(case, rank, world_size, combined, alive)


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _compat_round(
    buffer: Any, rank: int, world_size: int, case: dict, mode: str, plain: Callable = _direct
) -> tuple:
    """One low_latency_dispatch + low_latency_combine through the DeepEP drop-in; returns
    (dispatch result, combined, stats). ``plain(fn, *args)`` runs the test's own helpers (inputs,
    the simulated experts), which follow the default device, outside a client's mode."""
    num_local = case["E"] // world_size
    x, topk_idx, weights = plain(make_inputs, case, rank)
    stats = torch.zeros(num_local, dtype=torch.int32, device="cpu")
    hook_mode, async_mode = mode == "hook", mode == "async"
    result = buffer.low_latency_dispatch(
        x, topk_idx, case["T"], case["E"], cumulative_local_expert_recv_stats=stats,
        use_fp8=False, async_finish=async_mode, return_recv_hook=hook_mode,
    )  # fmt: skip
    result[4]() if hook_mode else result[3].current_stream_wait()
    expert_out = plain(simulated_gemm, result[0], False, rank, num_local)
    combined, event, hook = buffer.low_latency_combine(
        expert_out, topk_idx, weights, result[2], async_finish=async_mode,
        return_recv_hook=hook_mode,
    )  # fmt: skip
    hook() if hook_mode else event.current_stream_wait()
    return result, combined, stats


# ---------------------------------------------------------------------------- active_ranks > R


def run_long_active_ranks(rank: int, world_size: int, port: int, backend: str) -> dict:
    """``active_ranks`` longer than R (Mooncake's test: one entry per token; SGLang: max_ep_size
    slots): the first R entries are used, the rest is never touched; a masked entry inside the
    first R is honoured; a shorter tensor is rejected on every rank."""
    from ep_harness import init_group

    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    buffer = Buffer(group)
    case = _case(world_size)
    errors: list[str] = []
    everyone = [True] * world_size
    for length in (world_size, world_size + 6, 128):
        active = torch.full((length,), SENTINEL, dtype=torch.int32)
        active[:world_size] = 1
        found = _round(buffer, rank, world_size, case, active, everyone)
        errors += [f"[length {length}] {e}" for e in found]
        if active[world_size:].ne(SENTINEL).any() or active[:world_size].ne(1).any():
            errors.append(f"[length {length}] active_ranks changed: {active.tolist()}")
    # Each rank masks the other (inside the first R entries): only its own tokens and experts.
    active = torch.full((world_size + 6,), SENTINEL, dtype=torch.int32)
    active[:world_size] = 0
    active[rank] = 1
    alone = [r == rank for r in range(world_size)]
    errors += [f"[masked] {e}" for e in _round(buffer, rank, world_size, case, active, alone)]
    x, topk_idx, _ = make_inputs(case, rank)
    try:
        buffer.dispatch(x, topk_idx, active[: world_size - 1], case["T"], case["E"], SLOW_OK_US)
        errors.append("a too short active_ranks was accepted")
    except ValueError as exc:
        if f"shape [{world_size - 1}]" not in str(exc) or "at least R entries" not in str(exc):
            errors.append(f"unclear error for a short active_ranks: {exc}")
    found = _round(buffer, rank, world_size, case, torch.ones(128, dtype=torch.int32), everyone)
    errors += [f"[after the error] {e}" for e in found]
    buffer.destroy()
    dist.barrier()
    return {"errors": errors}


def run_long_active_ranks_kill(rank: int, world_size: int, port: int, backend: str) -> dict:
    """The last rank dies (SIGKILL) at the start of a dispatch; the survivors pass a longer
    ``active_ranks`` (through the DeepEP drop-in's attribute): the failure is written into the
    caller's tensor, entries beyond R are untouched, and DeepEP's mask query reports the rank."""
    from ep_harness import init_group

    from mooncake.ep import deep_ep_compat as deep_ep
    from mooncake.ep.faults import arm_kill

    group = init_group(rank, world_size, port, backend)
    buffer = deep_ep.Buffer(group, explicitly_destroy=True, enable_shrink=True)
    buffer.timeout_us = FAULT_TIMEOUT_US
    victim = world_size - 1
    active = torch.full((world_size + 3,), SENTINEL, dtype=torch.int32)
    active[:world_size] = 1
    buffer.active_ranks = active
    case = _case(world_size)
    errors: list[str] = []
    result, combined, _ = _compat_round(buffer, rank, world_size, case, "sync")
    errors += check_dispatch(case, rank, world_size, result, [True] * world_size, None)
    dist.barrier()
    if rank == victim:
        arm_kill("dispatch.start")
    survivors = [r != victim for r in range(world_size)]
    result, combined, _ = _compat_round(buffer, rank, world_size, case, "sync")
    errors += check_dispatch(case, rank, world_size, result, survivors, None)
    errors += check_combine(case, rank, world_size, combined, survivors)
    want = [int(a) for a in survivors] + [SENTINEL] * 3
    if active.tolist() != want:
        errors.append(f"caller's active_ranks {active.tolist()}, expected {want}")
    mask = torch.full((world_size,), 5, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(mask)
    if mask.tolist() != [int(not a) for a in survivors]:
        errors.append(f"mask after the failure {mask.tolist()}")
    buffer.destroy()
    return {"errors": errors}


# ---------------------------------------------------------------------------- attributes, rebuild


def run_attributes_and_rebuild(rank: int, world_size: int, port: int, backend: str) -> dict:
    """``group_size`` and ``_use_fallback``; then Mooncake's test_loop: the last rank constructs a
    second Buffer while the others call ``update_ep_member()`` (the collective sequences meet),
    and a full round is exact on every rank afterwards."""
    from ep_harness import init_group

    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    errors: list[str] = []
    case = _case(world_size)
    nbytes = Buffer.get_ep_buffer_size_hint(case["T"], case["H"], world_size, case["E"])
    buffer = Buffer(group, num_ep_buffer_bytes=nbytes)
    if buffer.group_size != world_size or buffer.num_ranks != world_size:
        errors.append(f"group_size {buffer.group_size}, num_ranks {buffer.num_ranks}")
    if buffer._use_fallback is not True or buffer.path.name != "portable":
        errors.append(f"_use_fallback {buffer._use_fallback} on path {buffer.path.name}")
    everyone = [True] * world_size
    errors += _round(
        buffer, rank, world_size, case, torch.ones(world_size, dtype=torch.int32), everyone
    )
    for _ in range(2):  # twice: the second time after a round on the rebuilt state
        if rank != world_size - 1:
            buffer.update_ep_member()
        else:
            buffer = Buffer(group, num_ep_buffer_bytes=nbytes)
        if buffer.num_ops != 0 or buffer.group_size != world_size:
            errors.append(f"after the rebuild: num_ops {buffer.num_ops}, R {buffer.group_size}")
        long_active = torch.ones(128, dtype=torch.int32)  # as Mooncake's test passes it
        errors += _round(buffer, rank, world_size, case, long_active, everyone)
    buffer.destroy()
    dist.barrier()
    return {"errors": errors}


class _GoneFastPath:
    """Stands in for a fast path whose ``update_ep_member`` finds it can no longer run: it issues
    the first exchange of the fast path's selection (``fast_path_setup.gather`` of this rank's
    probe) and raises ``PathUnavailable``, as ``CudaP2PPath.update_ep_member`` does when a rank
    cannot take part."""

    name = "fake-fast"
    reason = "test"

    def __init__(self, group: Any) -> None:
        self.group, self.destroyed = group, False

    def update_ep_member(self) -> None:
        from mooncake.ep.fast_path_setup import first_failure, gather
        from mooncake.ep.path import PathUnavailable

        failure = first_failure(gather(self.group, {"ok": False, "reason": "its GPU is gone"}))
        raise PathUnavailable(f"update_ep_member: the fast path cannot continue: {failure}")

    def destroy(self) -> None:
        self.destroyed = True


def run_fast_path_gone_at_update(rank: int, world_size: int, port: int, backend: str) -> dict:
    """The survivors' fast path cannot continue at ``update_ep_member`` while the last rank
    constructs a new Buffer (whose selection declines the fast path): the survivors fall back to
    the portable path after the same collectives, nobody hangs, and a full round is exact."""
    from ep_harness import init_group

    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    case = _case(world_size)
    errors: list[str] = []
    buffer = Buffer(group)
    if rank != world_size - 1:
        gone = _GoneFastPath(group)
        buffer._path = gone  # as if it had been selected
        buffer.update_ep_member()
        if not gone.destroyed or "cannot continue" not in buffer.path.reason:
            errors.append(f"no fallback: destroyed {gone.destroyed}, {buffer.path.reason!r}")
    else:
        buffer = Buffer(group)
    if buffer.path.name != "portable":
        errors.append(f"path {buffer.path.name} after the update")
    active = torch.ones(world_size, dtype=torch.int32)
    errors += _round(buffer, rank, world_size, case, active, [True] * world_size)
    buffer.destroy()
    dist.barrier()
    return {"errors": errors}


# ---------------------------------------------------------------------------- DeepEP's mask API


def run_mask_api(rank: int, world_size: int, port: int, backend: str) -> dict:
    """DeepEP's shrink-mode mask API on the portable path: query, update, clean, and the ops
    honour the masks (a masked rank is neither sent to nor waited for)."""
    from ep_harness import init_group

    from mooncake.ep import deep_ep_compat as deep_ep

    group = init_group(rank, world_size, port, backend)
    buffer = deep_ep.Buffer(
        group, low_latency_mode=True, explicitly_destroy=True, enable_shrink=True
    )
    case = _case(world_size)
    errors: list[str] = []
    everyone = [True] * world_size
    alone = [r == rank for r in range(world_size)]
    mask = torch.full((world_size,), 9, dtype=torch.int)

    def query(label: str, want: list[int]) -> None:
        buffer.low_latency_query_mask_buffer(mask)
        if mask.tolist() != want:
            errors.append(f"[{label}] rank {rank}: mask {mask.tolist()}, expected {want}")

    def compat_round(label: str, alive: list[bool], mode: str) -> None:
        result, combined, stats = _compat_round(buffer, rank, world_size, case, mode)
        found = check_dispatch(case, rank, world_size, result, alive, None)
        found += check_combine(case, rank, world_size, combined, alive)
        if not torch.equal(stats, result[1]):
            found.append(f"stats {stats.tolist()} != recv_count {result[1].tolist()}")
        errors.extend(f"[{label}] {e}" for e in found)

    query("fresh", [0] * world_size)
    compat_round("all", everyone, "sync")
    for other in range(world_size):  # each rank masks every other rank
        if other != rank:
            buffer.low_latency_update_mask_buffer(other, mask=True)
    query("masked", [int(not a) for a in alone])
    for mode in ("sync", "async", "hook"):
        compat_round(f"masked {mode}", alone, mode)
    query("masked after ops", [int(not a) for a in alone])  # ops never unmask
    for other in range(world_size):
        buffer.low_latency_update_mask_buffer(other, False)  # DeepEP passes mask positionally too
    query("unmasked", [0] * world_size)
    compat_round("unmasked", everyone, "hook")
    buffer.low_latency_update_mask_buffer((rank + 1) % world_size, True)
    buffer.low_latency_clean_mask_buffer()
    query("cleaned", [0] * world_size)
    compat_round("cleaned", everyone, "async")
    buffer.clean_low_latency_buffer(case["T"], case["H"], case["E"])
    for label, call, exc_type in (
        ("rank -1", lambda: buffer.low_latency_update_mask_buffer(-1, True), ValueError),
        ("rank R", lambda: buffer.low_latency_update_mask_buffer(world_size, True), ValueError),
        ("mask int64", lambda: buffer.low_latency_query_mask_buffer(mask.long()), TypeError),
        ("mask short", lambda: buffer.low_latency_query_mask_buffer(mask[:-1]), ValueError),
        ("clean hidden", lambda: buffer.clean_low_latency_buffer(16, 100, case["E"]), ValueError),
    ):
        try:
            call()
            errors.append(f"[{label}] accepted")
        except exc_type:
            pass
    buffer.destroy()
    buffer.destroy()  # idempotent
    dist.barrier()
    return {"errors": errors}


# ---------------------------------------------------------------------------- default device


def run_default_device(
    rank: int, world_size: int, port: int, backend: str, default_device: str
) -> dict:
    """Everything a client does under ``torch.set_default_device(default_device)`` (clients set
    'cuda'; 'meta' here makes any allocation that follows the default device fail or come out
    wrong): construction (collective), ops in every mode, zero-copy, the DeepEP drop-in with its
    mask API, and ``update_ep_member``. Inputs are made, and results checked, outside the mode."""
    from ep_harness import init_group

    from mooncake.ep import deep_ep_compat as deep_ep
    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    case = _case(world_size)
    num_local = case["E"] // world_size
    everyone = [True] * world_size
    x, topk_idx, weights = make_inputs(case, rank)
    errors: list[str] = []
    results: list[tuple[str, Any, Any]] = []

    def plain(fn: Callable[..., Any], *args: Any) -> Any:
        torch.set_default_device(None)
        try:
            return fn(*args)
        finally:
            torch.set_default_device(default_device)

    fp8_case = dict(case, use_fp8=True)
    torch.set_default_device(default_device)
    try:
        buffer = Buffer(group)
        compat = deep_ep.Buffer(group, explicitly_destroy=True, enable_shrink=True)
        # The selection's exchanges run under the mode too; one that raised would be declined
        # (on every rank alike) rather than fail, so look at the reason.
        if "raised" in buffer.path.reason:
            errors.append(f"path selection failed under the mode: {buffer.path.reason}")
        active = torch.ones(world_size + 2, dtype=torch.int32, device="cpu")
        for mode in ("sync", "async", "hook"):
            hook_mode, async_mode = mode == "hook", mode == "async"
            recv = buffer.dispatch(
                x, topk_idx, active, case["T"], case["E"], SLOW_OK_US, use_fp8=True,
                async_finish=async_mode, return_recv_hook=hook_mode,
            )  # fmt: skip
            recv[4]() if hook_mode else recv[3].current_stream_wait()
            expert_out = plain(simulated_gemm, recv[0], True, rank, num_local)
            if mode == "hook":  # zero-copy: the outputs go straight into the next op's buffer
                buffer.get_next_combine_buffer(recv[2])[:, :, :] = expert_out
            out = buffer.combine(
                expert_out, topk_idx, weights, active, SLOW_OK_US, recv[2],
                zero_copy=mode == "hook", async_finish=async_mode, return_recv_hook=hook_mode,
            )  # fmt: skip
            out[2]() if hook_mode else out[1].current_stream_wait()
            results.append((mode, recv, out[0]))
        buffer.update_ep_member()
        compat.low_latency_update_mask_buffer((rank + 1) % world_size, True)
        compat.low_latency_clean_mask_buffer()
        mask = torch.full((world_size,), 3, dtype=torch.int32, device="cpu")
        compat.low_latency_query_mask_buffer(mask)
        compat_result, compat_combined, _ = _compat_round(
            compat, rank, world_size, case, "async", plain
        )
        buffer.destroy()
        compat.destroy()
    finally:
        torch.set_default_device(None)
    if mask.tolist() != [0] * world_size:
        errors.append(f"mask {mask.tolist()}")
    for mode, recv, combined in results:
        for tensor in (recv[0][0], recv[0][1], recv[1], recv[2][0], recv[2][1], combined):
            if tensor.device.type != "cpu":
                errors.append(f"[{mode}] an output is on {tensor.device}")
        found = check_dispatch(fp8_case, rank, world_size, recv, everyone, None)
        found += check_combine(fp8_case, rank, world_size, combined, everyone)
        errors.extend(f"[{mode}] {e}" for e in found)
    found = check_dispatch(case, rank, world_size, compat_result, everyone, None)
    found += check_combine(case, rank, world_size, compat_combined, everyone)
    errors.extend(f"[compat] {e}" for e in found)
    if active.tolist() != [1] * (world_size + 2):
        errors.append(f"active_ranks {active.tolist()}")
    dist.barrier()
    return {"errors": errors}


# ---------------------------------------------------------------------------- fast path (GPU)


def run_fast_path_client(rank: int, world_size: int, port: int, backend: str) -> dict:
    """The fast path the way DeepEP's and Mooncake's tests drive it: under
    ``torch.set_default_device("cuda")``, FP8 with cumulative stats in every mode, through the
    DeepEP drop-in and through ``Buffer`` with an ``active_ranks`` longer than R; exact against
    the reference, the entries beyond R untouched."""
    from ep_harness import init_group

    from mooncake.ep import deep_ep_compat as deep_ep

    torch.cuda.set_device(0)
    group = init_group(rank, world_size, port, backend)
    case = dict(CASE, E=8 * world_size, use_fp8=True, name="fast")
    T, H, E, num_local = case["T"], case["H"], case["E"], case["E"] // world_size
    dev = torch.device("cuda", 0)
    x, topk_idx, weights = (t.to(dev) for t in make_inputs(case, rank))
    errors: list[str] = []
    everyone = [True] * world_size
    results: list[tuple] = []
    torch.set_default_device("cuda")
    try:
        nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, world_size, E)
        compat = deep_ep.Buffer(
            group,
            num_rdma_bytes=nbytes,
            low_latency_mode=True,
            explicitly_destroy=True,
            enable_shrink=True,
        )
        buffer = compat.mooncake_buffer
        if buffer.path.name != "cuda-p2p" or buffer._use_fallback:
            errors.append(f"path {buffer.path.name} ({buffer.path.reason})")
        long_active = torch.full((world_size + 5,), SENTINEL, dtype=torch.int32, device=dev)
        long_active[:world_size] = 1
        for use_compat in (True, False):
            for mode in ("sync", "async", "hook", "sync"):
                hook_mode, async_mode = mode == "hook", mode == "async"
                stats = torch.zeros(num_local, dtype=torch.int32, device=dev)
                flags = {"async_finish": async_mode, "return_recv_hook": hook_mode}
                if use_compat:
                    recv = compat.low_latency_dispatch(
                        x, topk_idx, T, E, cumulative_local_expert_recv_stats=stats, **flags
                    )
                else:
                    recv = buffer.dispatch(
                        x, topk_idx, long_active, T, E, SLOW_OK_US,
                        cumulative_local_expert_recv_stats=stats, **flags,
                    )  # fmt: skip
                recv[4]() if hook_mode else recv[3].current_stream_wait()
                handle = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in recv[2])
                cpu_recv = (tuple(t.cpu() for t in recv[0]), recv[1].cpu(), handle)
                torch.set_default_device(None)  # the test's helpers follow the default device
                expert_out = simulated_gemm(cpu_recv[0], True, rank, num_local).to(dev)
                torch.set_default_device("cuda")
                if use_compat:
                    out = compat.low_latency_combine(
                        expert_out, topk_idx, weights, recv[2], **flags
                    )
                else:
                    out = buffer.combine(
                        expert_out, topk_idx, weights, long_active, SLOW_OK_US, recv[2], **flags
                    )
                out[2]() if hook_mode else out[1].current_stream_wait()
                label = f"[{'compat' if use_compat else 'long active'} {mode}]"
                results.append((label, cpu_recv, out[0].cpu(), stats.cpu()))
        mask = torch.full((world_size,), 3, dtype=torch.int32, device=dev)
        compat.low_latency_query_mask_buffer(mask)
        if mask.tolist() != [0] * world_size:
            errors.append(f"mask {mask.tolist()}")
        compat.destroy()
    finally:
        torch.set_default_device(None)
    for label, cpu_recv, combined, stats in results:
        found = check_dispatch(case, rank, world_size, cpu_recv, everyone, None)
        found += check_combine(case, rank, world_size, combined, everyone)
        if not torch.equal(stats, cpu_recv[1]):
            found.append(f"stats {stats.tolist()} != recv_count {cpu_recv[1].tolist()}")
        errors.extend(f"{label} {e}" for e in found)
    want = [1] * world_size + [SENTINEL] * 5
    if long_active.tolist() != want:
        errors.append(f"long active_ranks {long_active.tolist()}, expected {want}")
    dist.barrier()
    return {"errors": errors}
