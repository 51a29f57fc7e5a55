"""The CUDA fast path (``cuda-p2p``) on one GPU: R ranks as processes (time-sliced).

Each case runs on the fast path (CUDA tensors) and on the portable path (the same inputs on CPU, a
second Buffer over its own gloo group) in the same process; results must match bit for bit (BF16 and
FP8 bytes: the kernels implement the contract's cast exactly) and match the reference
(``ep_cases.check_dispatch`` / ``check_combine``). Also: CUDA-graph capture and replay, a silent
rank (timeout), a rank that is 0 on entry, the staged put path, and real kills (SIGKILL).

Skipped without a CUDA GPU of sm_90+ or without the built library. Non-fault ops use a 10 s timeout:
processes on one GPU time-slice (about 2.5 ms per cross-process round trip).
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple, Optional

import pytest
import torch

SLOW_OK_US = 10_000_000  # timeout of ops that must not fail (time slicing is slow, not dead)
FAULT_TIMEOUT_US = 1_000_000
MARK_SLACK_S = 0.1  # contract: a failed rank is marked within timeout_us + 100 ms


def _unusable_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from mooncake.ep import _cuda

        _cuda.load()
    except OSError as exc:
        return str(exc)
    major, minor = torch.cuda.get_device_capability(0)
    if major < 9:
        return f"GPU is sm_{major}{minor}, the kernels need sm_90+"
    return None


REASON = _unusable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(REASON is not None, reason=f"CUDA fast path not runnable here: {REASON}"),
]


# ---------------------------------------------------------------------------- per-rank helpers


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_cpu(v) for v in value)
    return value


def _buffers(
    rank: int, world_size: int, port: int, backend: str, shapes: list[tuple[int, int, int]]
):
    """(fast Buffer on the WORLD gloo group, portable Buffer on a second gloo group)."""
    import torch.distributed as dist
    from ep_harness import init_group

    from mooncake.ep.buffer import Buffer

    torch.cuda.set_device(0)
    group = init_group(rank, world_size, port, backend)
    portable_group = dist.new_group(backend="gloo")
    nbytes = max(Buffer.get_ep_buffer_size_hint(t, h, world_size, e) for t, h, e in shapes)
    fast = Buffer(group, nbytes, path="fast")
    portable = Buffer(portable_group, 0, path="portable")
    return fast, portable


def _wait(mode: str, event: Any, hook: Any) -> None:
    if mode == "hook":
        hook()
    elif mode == "async":
        event.current_stream_wait()


def _compare_dispatch(name: str, got: tuple, want: tuple, use_fp8: bool) -> list[str]:
    """Fast vs portable dispatch outputs (CPU), valid rows only."""
    errors = []
    (gx, gcount, ghandle), (wx, wcount, whandle) = got[:3], want[:3]
    if not torch.equal(gcount, wcount):
        return [f"[{name}] recv_count {gcount.tolist()} != portable {wcount.tolist()}"]
    if not torch.equal(ghandle[1], whandle[1]):
        errors.append(f"[{name}] layout_range differs from the portable path")
    for local, count in enumerate(gcount.tolist()):
        if not torch.equal(ghandle[0][local, :count], whandle[0][local, :count]):
            errors.append(f"[{name}] expert {local}: src_info differs from the portable path")
        if use_fp8:
            if not torch.equal(
                gx[0][local, :count].view(torch.uint8), wx[0][local, :count].view(torch.uint8)
            ):
                errors.append(f"[{name}] expert {local}: FP8 bytes differ from the portable path")
            if not torch.equal(gx[1][local, :count], wx[1][local, :count]):
                errors.append(f"[{name}] expert {local}: scales differ from the portable path")
        elif not torch.equal(gx[local, :count], wx[local, :count]):
            errors.append(f"[{name}] expert {local}: BF16 rows differ from the portable path")
    return errors


def _run_case(fast: Any, portable: Any, rank: int, num_ranks: int, case: dict) -> list[str]:
    from ep_cases import check_combine, check_dispatch, make_inputs, simulated_gemm

    errors: list[str] = []
    name, mode = case["name"], case.get("mode", "sync")
    dev = torch.device("cuda", 0)
    use_fp8 = case.get("use_fp8", False)
    opts = {
        "use_fp8": use_fp8,
        "round_scale": case.get("round_scale", False),
        "use_ue8m0": case.get("use_ue8m0", False),
    }
    num_local = case["E"] // num_ranks
    x, topk_idx, weights = make_inputs(case, rank)
    alive = [True] * num_ranks

    active = torch.ones(num_ranks, dtype=torch.int32, device=dev)
    stats = torch.zeros(num_local, dtype=torch.int32, device=dev)
    res = fast.dispatch(
        x.to(dev),
        topk_idx.to(dev),
        active,
        case["T"],
        case["E"],
        SLOW_OK_US,
        **opts,
        async_finish=mode == "async",
        return_recv_hook=mode == "hook",
        cumulative_local_expert_recv_stats=stats,
    )
    if (mode == "hook") != callable(res[4]):
        errors.append(f"[{name}] hook is {res[4]!r} in mode {mode}")
    _wait(mode, res[3], res[4])
    got = _cpu(res[:3])
    errors += check_dispatch(case, rank, num_ranks, got, alive, stats.cpu())

    p_active = torch.ones(num_ranks, dtype=torch.int32)
    want = portable.dispatch(x, topk_idx, p_active, case["T"], case["E"], -1, **opts)
    errors += _compare_dispatch(name, got, want, use_fp8)

    sim = simulated_gemm(got[0], use_fp8, rank, num_local)
    out = (
        torch.empty((x.shape[0], case["H"]), dtype=torch.bfloat16, device=dev)
        if case.get("use_out")
        else None
    )
    if case.get("zero_copy"):
        staged = fast.get_next_combine_buffer(res[2])
        staged[:, :, :] = sim.to(dev)
        comb_x = staged
    else:
        comb_x = sim.to(dev)
    combined, event, hook = fast.combine(
        comb_x,
        topk_idx.to(dev),
        weights.to(dev),
        active,
        SLOW_OK_US,
        res[2],
        zero_copy=case.get("zero_copy", False),
        async_finish=mode == "async",
        return_recv_hook=mode == "hook",
        out=out,
    )
    _wait(mode, event, hook)
    if out is not None and combined.data_ptr() != out.data_ptr():
        errors.append(f"[{name}] combine did not write into out")
    combined_cpu = combined.cpu()
    errors += check_combine(case, rank, num_ranks, combined_cpu, alive)
    want_c = portable.combine(sim, topk_idx, weights, p_active, -1, want[2])[0]
    if not torch.equal(combined_cpu, want_c):
        errors.append(f"[{name}] combine differs from the portable path")
    if active.tolist() != [1] * num_ranks:
        errors.append(f"[{name}] active_ranks changed without failures: {active.tolist()}")
    return errors


def _run_two_alive(fast: Any, rank: int, num_ranks: int, case: dict) -> list[str]:
    """Two dispatches alive (hooks in reverse order), then both combines with hooks."""
    from ep_cases import check_combine, check_dispatch, make_inputs, simulated_gemm

    dev = torch.device("cuda", 0)
    use_fp8 = case.get("use_fp8", False)
    num_local = case["E"] // num_ranks
    active = torch.ones(num_ranks, dtype=torch.int32, device=dev)
    alive = [True] * num_ranks
    inputs = [make_inputs(case, rank, 0), make_inputs(case, rank, 1)]
    res = [
        fast.dispatch(
            x.to(dev),
            t.to(dev),
            active,
            case["T"],
            case["E"],
            SLOW_OK_US,
            use_fp8=use_fp8,
            return_recv_hook=True,
        )
        for x, t, _ in inputs
    ]
    res[1][4]()
    res[0][4]()
    errors = []
    outs = []
    for seed, (r, i) in enumerate(zip(res, inputs)):
        got = _cpu(r[:3])
        errors += check_dispatch(case, rank, num_ranks, got, alive, None, seed)
        sim = simulated_gemm(got[0], use_fp8, rank, num_local).to(dev)
        outs.append(
            fast.combine(
                sim, i[1].to(dev), i[2].to(dev), active, SLOW_OK_US, r[2], return_recv_hook=True
            )
        )
    for o in reversed(outs):
        o[2]()
    for seed, o in enumerate(outs):
        errors += check_combine(case, rank, num_ranks, o[0].cpu(), alive, seed)
    return errors


def _expert_factors(rank: int, num_local: int) -> torch.Tensor:
    from ep_cases import expert_scale

    factors = [expert_scale(rank * num_local + e) for e in range(num_local)]
    return torch.tensor(factors, dtype=torch.bfloat16).cuda().view(-1, 1, 1)


def _expert_on_gpu(recv_x: Any, use_fp8: bool, factors: torch.Tensor) -> torch.Tensor:
    """``ep_cases.simulated_gemm`` with torch ops on the GPU (capturable), bit-identical to it."""
    if use_fp8:
        data, scales = recv_x
        groups = data.shape[-1] // 128
        values = (data.float().view(*data.shape[:-1], groups, 128) * scales.unsqueeze(-1)).view(
            data.shape
        )
        values = values.to(torch.bfloat16)
    else:
        values = recv_x
    return values * factors


def _run_graph(fast: Any, rank: int, num_ranks: int, case: dict) -> list[str]:
    """Capture dispatch + expert + combine in a CUDA graph; replays on new inputs equal eager
    calls."""
    from ep_cases import make_inputs

    dev = torch.device("cuda", 0)
    use_fp8 = case.get("use_fp8", False)
    num_local = case["E"] // num_ranks
    T, E = case["T"], case["E"]
    x0, t0, w0 = make_inputs(case, rank, 0)
    sx, stopk, sw = x0.to(dev), t0.to(dev), w0.to(dev)
    active = torch.ones(num_ranks, dtype=torch.int32, device=dev)
    factors = _expert_factors(rank, num_local)

    def step() -> tuple:
        recv_x, count, handle, _, _ = fast.dispatch(
            sx, stopk, active, T, E, SLOW_OK_US, use_fp8=use_fp8
        )
        sim = _expert_on_gpu(recv_x, use_fp8, factors)
        combined = fast.combine(sim, stopk, sw, active, SLOW_OK_US, handle)[0]
        return count, combined

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (allocator pools, lazy loading)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_count, g_combined = step()
    errors = []
    for seed in (1, 2, 3):
        x, t, w = make_inputs(case, rank, seed)
        sx.copy_(x)
        stopk.copy_(t)
        sw.copy_(w)
        graph.replay()
        r_count, r_combined = g_count.clone(), g_combined.clone()
        e_count, e_combined = step()  # eager on the same inputs
        if not torch.equal(r_count, e_count):
            errors.append(f"[{case['name']}] graph replay {seed}: recv_count differs from eager")
        if not torch.equal(r_combined, e_combined):
            errors.append(f"[{case['name']}] graph replay {seed}: combine differs from eager")
    torch.cuda.synchronize()
    if active.tolist() != [1] * num_ranks:
        errors.append(f"[{case['name']}] graph: active_ranks {active.tolist()}")
    return errors


def _run_missing_rank(
    fast: Any, rank: int, num_ranks: int, case: dict, entry_zero: bool
) -> list[str]:
    """The last rank sits this op out (alive, silent). entry_zero: the others pass active[last]=0
    (nothing is waited for); else they find out by the deadline (FAULT_TIMEOUT_US)."""
    from ep_cases import check_combine, check_dispatch, make_inputs, simulated_gemm

    silent = num_ranks - 1
    if rank == silent:
        time.sleep(2 * FAULT_TIMEOUT_US / 1e6)
        return []
    dev = torch.device("cuda", 0)
    num_local = case["E"] // num_ranks
    x, topk_idx, weights = make_inputs(case, rank)
    alive = [r != silent for r in range(num_ranks)]
    active = torch.ones(num_ranks, dtype=torch.int32, device=dev)
    if entry_zero:
        active[silent] = 0
    torch.cuda.synchronize()
    start = time.monotonic()
    res = fast.dispatch(
        x.to(dev), topk_idx.to(dev), active, case["T"], case["E"], FAULT_TIMEOUT_US, use_fp8=False
    )
    torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    errors = []
    label = f"[{case['name']} {'entry0' if entry_zero else 'timeout'}] rank {rank}"
    limit = 0.5 * FAULT_TIMEOUT_US / 1e6 if entry_zero else FAULT_TIMEOUT_US / 1e6 + MARK_SLACK_S
    if elapsed > limit:
        errors.append(f"{label}: dispatch took {elapsed * 1e3:.1f} ms (limit {limit * 1e3:.0f} ms)")
    if active.tolist() != [int(a) for a in alive]:
        errors.append(f"{label}: active_ranks {active.tolist()} after dispatch")
    got = _cpu(res[:3])
    errors += check_dispatch(case, rank, num_ranks, got, alive, None)
    sim = simulated_gemm(got[0], False, rank, num_local).to(dev)
    start = time.monotonic()
    combined = fast.combine(
        sim, topk_idx.to(dev), weights.to(dev), active, FAULT_TIMEOUT_US, res[2]
    )[0]
    torch.cuda.synchronize()
    if time.monotonic() - start > 0.5 * FAULT_TIMEOUT_US / 1e6:
        errors.append(f"{label}: combine waited for a rank already marked failed")
    errors += check_combine(case, rank, num_ranks, combined.cpu(), alive)
    return errors


# ---------------------------------------------------------------------------- rank entry points


def _resolve(case: dict, world_size: int) -> dict:
    case = dict(case)
    if "L" in case:
        case["E"] = case.pop("L") * world_size
    return case


def rank_matrix(
    rank: int, world_size: int, port: int, backend: str, cases: list[dict], extras: list[str]
) -> dict:
    import torch.distributed as dist

    cases = [_resolve(c, world_size) for c in cases]
    fast, portable = _buffers(
        rank, world_size, port, backend, [(c["T"], c["H"], c["E"]) for c in cases]
    )
    errors: list[str] = []
    expected = os.environ.get("MOONCAKE_EP_TEST_EXPECT_PATH", "cuda-p2p")  # test_cuda_proxy
    if fast.path.name != expected:
        return {"errors": [f"path is {fast.path.name}: {fast.path.reason}"], "path": fast.path.name}
    timings = {}
    for case in cases:
        start = time.monotonic()
        errors += _run_case(fast, portable, rank, world_size, case)
        timings[case["name"]] = round(time.monotonic() - start, 3)
    base = cases[0]
    if "update" in extras:
        # Collective re-exchange with unchanged membership: mappings kept, signal words and op
        # numbers reset on every rank; ops keep working (and a changed layout with them).
        fast.update_ep_member()
        errors += _run_case(
            fast, portable, rank, world_size, {**base, "name": "after update_ep_member"}
        )
    if "two_alive" in extras:
        errors += _run_two_alive(fast, rank, world_size, base)
    if "graph" in extras:
        for use_fp8 in (False, True):
            errors += _run_graph(
                fast, rank, world_size, {**base, "name": f"graph fp8={use_fp8}", "use_fp8": use_fp8}
            )
    if "missing" in extras and world_size > 1:
        errors += _run_missing_rank(fast, rank, world_size, base, entry_zero=True)
        errors += _run_missing_rank(fast, rank, world_size, base, entry_zero=False)
    flags = fast.path.error_flags()
    if flags:
        errors.append(f"rank {rank}: kernel error flags {flags:#x}")
    dist.barrier()
    report = {"errors": errors, "path": fast.path.name, "timings": timings}
    if hasattr(fast.path, "proxy_stats"):
        report["proxy"] = {"stats": fast.path.proxy_stats(), "transports": fast.path.transports()}
    return report


def rank_kill(
    rank: int, world_size: int, port: int, backend: str, case: dict, point: str, occurrence: int
) -> dict:
    """Two healthy rounds, then the last rank SIGKILLs itself at ``point``; survivors keep going."""
    from mooncake.ep import faults

    case = _resolve(case, world_size)
    fast, _ = _buffers(rank, world_size, port, backend, [(case["T"], case["H"], case["E"])])
    victim = world_size - 1
    active = torch.ones(world_size, dtype=torch.int32, device=torch.device("cuda", 0))
    if rank == victim:
        faults.arm_kill(point, occurrence)
    errors: list[str] = []
    marks: list[float] = []
    for round_index in range(4):
        alive_before = [bool(a) for a in active.tolist()]
        r = _checked_round(
            fast, rank, world_size, case, active, round_index, f"round {round_index}"
        )
        errors += r.errors
        alive_d, alive_c, d_elapsed, c_elapsed = r.alive_d, r.alive_c, r.d_s, r.c_s
        limit = FAULT_TIMEOUT_US / 1e6 + MARK_SLACK_S
        phases = (
            ("dispatch", alive_before, alive_d, d_elapsed),
            ("combine", alive_d, alive_c, c_elapsed),
        )
        for what, before, after, elapsed in phases:
            label = f"rank {rank} round {round_index}: {what}"
            if before != after:
                marks.append(round(elapsed, 4))
                if elapsed > limit:
                    errors.append(f"{label} marked {after} after {elapsed:.3f} s")
            elif elapsed > 0.5 * FAULT_TIMEOUT_US / 1e6:
                errors.append(f"{label} took {elapsed:.3f} s without a failure")
    if active.tolist()[victim] != 0:
        errors.append(f"rank {rank}: the killed rank is still active: {active.tolist()}")
    return {"errors": errors, "marks": marks}


JOIN_DEADLINE_S = 120.0  # replacement: the backend notices the kill (heartbeats), then admits


def _fast_only(
    rank: int, world_size: int, port: int, backend: str, case: dict, options: Any = None
):
    """A fast-path Buffer on the WORLD group of ``backend`` (no portable twin: a replacement must
    run the same collectives as the survivors)."""
    from ep_harness import init_group

    from mooncake.ep.buffer import Buffer

    torch.cuda.set_device(0)
    group = init_group(rank, world_size, port, backend, pg_options=options)
    if options is not None:  # a replacement: wait until the survivors admitted it
        import torch.distributed as dist

        import mooncake.pg as pg

        pg.join_group(dist.group.WORLD._get_backend(torch.device("cpu")), timeout=JOIN_DEADLINE_S)
    nbytes = Buffer.get_ep_buffer_size_hint(case["T"], case["H"], world_size, case["E"])
    return Buffer(group, nbytes, path="fast")


class _Round(NamedTuple):
    errors: list[str]
    d_s: float  # dispatch seconds
    c_s: float  # combine seconds
    alive_d: list[bool]  # active_ranks after the dispatch
    alive_c: list[bool]  # active_ranks after the combine


def _checked_round(
    fast: Any,
    rank: int,
    world_size: int,
    case: dict,
    active: torch.Tensor,
    round_index: int,
    label: str,
) -> _Round:
    """One dispatch + combine on the fast path against the reference, for the ranks alive in
    ``active`` after each op."""
    from ep_cases import check_combine, check_dispatch, make_inputs, simulated_gemm

    dev = torch.device("cuda", 0)
    num_local = case["E"] // world_size
    use_fp8 = case.get("use_fp8", False)
    x, topk_idx, weights = make_inputs(case, rank, round_index)
    torch.cuda.synchronize()
    start = time.monotonic()
    res = fast.dispatch(
        x.to(dev), topk_idx.to(dev), active, case["T"], case["E"], FAULT_TIMEOUT_US, use_fp8=use_fp8
    )
    torch.cuda.synchronize()
    d_elapsed = time.monotonic() - start
    alive_d = [bool(a) for a in active.tolist()]
    got = _cpu(res[:3])
    errors = check_dispatch(case, rank, world_size, got, alive_d, None, round_index)
    sim = simulated_gemm(got[0], use_fp8, rank, num_local).to(dev)
    start = time.monotonic()
    combined = fast.combine(
        sim, topk_idx.to(dev), weights.to(dev), active, FAULT_TIMEOUT_US, res[2]
    )[0]
    torch.cuda.synchronize()
    c_elapsed = time.monotonic() - start
    alive_c = [bool(a) for a in active.tolist()]
    errors += check_combine(case, rank, world_size, combined.cpu(), alive_c, round_index)
    return _Round(
        [f"rank {rank} {label}: {e}" for e in errors], d_elapsed, c_elapsed, alive_d, alive_c
    )


def rank_replace_survivor(rank: int, world_size: int, port: int, backend: str, case: dict) -> dict:
    """Round 0 with everyone; the last rank SIGKILLs itself at the start of round 1's dispatch;
    survivors mark it, then admit its replacement (``get_peer_state`` / ``recover_ranks``),
    re-map its new buffer (``update_ep_member``) and run round 2 with everyone."""
    import torch.distributed as dist

    import mooncake.pg as pg
    from mooncake.ep import faults

    case = _resolve(case, world_size)
    fast = _fast_only(rank, world_size, port, backend, case)
    victim = world_size - 1
    dev = torch.device("cuda", 0)
    active = torch.ones(world_size, dtype=torch.int32, device=dev)
    report: dict = {"path": fast.path.name}
    errors = _checked_round(fast, rank, world_size, case, active, 0, "round 0").errors
    dist.barrier()
    if rank == victim:
        faults.arm_kill("dispatch.start", 1)
    e, d_s = _checked_round(fast, rank, world_size, case, active, 1, "round 1")[:2]
    errors += e
    limit = FAULT_TIMEOUT_US / 1e6 + MARK_SLACK_S
    if active.tolist()[victim] != 0 or d_s > limit:
        errors.append(f"rank {rank}: round 1 active {active.tolist()} after {d_s:.3f} s > {limit}")
    report["mark_s"] = round(d_s, 4)
    backend_obj = dist.group.WORLD._get_backend(torch.device("cpu"))
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while not pg.get_peer_state(backend_obj, [victim])[0]:
        if time.monotonic() > deadline:
            errors.append(
                f"rank {rank}: no replacement of rank {victim} within {JOIN_DEADLINE_S} s"
            )
            report["errors"] = errors
            return report
        time.sleep(0.05)
    pg.recover_ranks(backend_obj, [victim])
    fast.update_ep_member()  # the replacement's new IPC handle is mapped here
    report["path_after"] = fast.path.name
    active.fill_(1)
    e = _checked_round(
        fast, rank, world_size, case, active, 2, "round 2 (after replacement)"
    ).errors
    errors += e
    if active.tolist() != [1] * world_size:
        errors.append(f"rank {rank}: round 2 active {active.tolist()}")
    flags = fast.path.error_flags()
    if flags:
        errors.append(f"rank {rank}: kernel error flags {flags:#x}")
    dist.barrier()
    report["errors"] = errors
    return report


def rank_replacement(rank: int, world_size: int, port: int, backend: str, case: dict) -> dict:
    """The new process in the killed rank's place: joins, builds its fast path (new buffer, new
    IPC handle), runs round 2 with everyone."""
    import torch.distributed as dist

    import mooncake.pg as pg

    case = _resolve(case, world_size)
    options = pg.MooncakeBackendOptions(
        torch.ones(world_size, dtype=torch.int32), is_extension=True
    )
    fast = _fast_only(rank, world_size, port, backend, case, options)
    active = torch.ones(world_size, dtype=torch.int32, device=torch.device("cuda", 0))
    errors = _checked_round(fast, rank, world_size, case, active, 2, "replacement round 2").errors
    if active.tolist() != [1] * world_size:
        errors.append(f"replacement: active {active.tolist()}")
    dist.barrier()
    return {"errors": errors, "path": fast.path.name}


# ---------------------------------------------------------------------------- tests


def _case(name: str, **options: Any) -> dict:
    """A case of ``ep_cases`` (``L`` local experts per rank; T=16, H=2048, 3 experts, top-4 unless
    given)."""
    return {"name": name, "T": 16, "H": 2048, "L": 3, "K": 4, **options}


FP8 = {"use_fp8": True}
UE8M0 = {"use_fp8": True, "round_scale": True, "use_ue8m0": True}
CASES = [
    _case("bf16 sync"),
    _case("fp8 sync", **FP8),
    _case("fp8 round", use_fp8=True, round_scale=True),
    _case("fp8 ue8m0", **UE8M0),
    _case("bf16 hook", mode="hook"),
    _case("fp8 async", mode="async", **FP8),
    _case("fp8 hook zero_copy out", mode="hook", zero_copy=True, use_out=True, **FP8),
    _case(
        "bf16 random masked",
        T=24,
        H=7168,
        L=4,
        K=8,
        structured=False,
        masked=9,
        tokens=[24, 17, 0, 5],
    ),
    _case(
        "fp8 random generic H", T=12, H=384, L=2, K=3, structured=False, tokens=[12, 0, 7], **FP8
    ),
    _case("fp8 ue8m0 generic H 640", T=8, H=640, L=5, K=6, structured=False, **UE8M0),
    _case("bf16 large H 9216", T=8, H=9216, L=2, K=2, structured=False, use_out=True),
    _case("fp8 K16", T=8, H=1024, L=8, K=16, structured=False, **FP8),
]


def _run(
    world_size: int, target: str, args: tuple, env: Optional[dict] = None, timeout: float = 400
) -> list:
    from ep_harness import assert_all_ok, run_world

    return assert_all_ok(
        run_world(world_size, target, args, backend="gloo", timeout=timeout, env=env)
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 4])
def test_cuda_matrix(world_size: int) -> None:
    """Every option combination, both paths on the same inputs, hooks, graphs, silent ranks."""
    values = _run(
        world_size,
        "test_cuda_fast_path:rank_matrix",
        (CASES, ["update", "two_alive", "graph", "missing"]),
    )
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors[:40])
    assert all(v["path"] == "cuda-p2p" for v in values)


@pytest.mark.timeout(300)
def test_cuda_staged_transport() -> None:
    """The staged put path (the one a proxy/NVSHMEM transport takes) over the same mappings."""
    cases = [CASES[1], CASES[7], CASES[9]]
    values = _run(
        2,
        "test_cuda_fast_path:rank_matrix",
        (cases, []),
        env={"MOONCAKE_EP_TRANSPORT": "p2p-staged"},
    )
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors[:40])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("world_size", "point", "occurrence"),
    [(2, "dispatch.start", 3), (4, "dispatch.start", 3), (4, "combine.after_send", 2)],
)
def test_cuda_kill(world_size: int, point: str, occurrence: int) -> None:
    """SIGKILL the last rank; survivors mark it within timeout_us + 100 ms and stay correct."""
    from ep_harness import run_world

    case = _case("kill", **FP8)
    args = (case, point, occurrence)
    results = run_world(
        world_size, "test_cuda_fast_path:rank_kill", args, backend="gloo", timeout=240
    )
    victim = results[-1]
    assert victim.exitcode == -9, f"victim: exit {victim.exitcode}, {victim.error[:500]}"
    assert not victim.ok
    errors = []
    for r in results[:-1]:
        assert r.ok, f"rank {r.rank}: {r.error}"
        errors += r.value["errors"]
        assert r.value["marks"], f"rank {r.rank} never marked the killed rank"
    assert not errors, "\n".join(errors[:40])


@pytest.mark.timeout(400)
def test_cuda_kill_then_replacement() -> None:
    """SIGKILL a rank, a new process joins in its place (mooncake-cpu backend recovery), survivors
    re-map its new buffer with ``update_ep_member``; a full round is exact on every rank."""
    pytest.importorskip("mooncake.pg", reason="mooncake.pg (mooncake-backend) is not installed")
    from ep_harness import spawn_rank, start_world

    world_size, victim = 3, 2
    case = _case("replace", **FP8)
    world = start_world(
        world_size, "test_cuda_fast_path:rank_replace_survivor", (case,), backend="mooncake-cpu"
    )
    world.procs[str(victim)].join(200)
    assert world.procs[str(victim)].exitcode == -9, "the victim did not die by SIGKILL"
    spawn_rank(
        world,
        victim,
        "test_cuda_fast_path:rank_replacement",
        (case,),
        "mooncake-cpu",
        slot=f"{victim}-replacement",
    )
    results = world.results(300)
    problems = []
    for r in results:
        if r.slot == str(victim):
            continue
        if not r.ok:
            problems.append(f"slot {r.slot}: {r.error[-3000:]}")
            continue
        problems += r.value["errors"]
        if r.value["path"] != "cuda-p2p" or r.value.get("path_after", "cuda-p2p") != "cuda-p2p":
            problems.append(f"slot {r.slot}: path {r.value}")
    assert len(results) == world_size + 1
    assert not problems, "\n".join(problems[:40])
