"""Per-rank test bodies: inputs, one dispatch/combine case with exact checks, case runners.

Every rank regenerates every other rank's inputs from seeds, so the expected results come from
``mooncake.ep.reference`` without any extra communication. A case returns a list of failure
strings (empty = pass) and never skips an op because a check failed, so ranks stay in step.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist

from mooncake.ep.fp8 import calc_diff, num_scale_groups, num_ue8m0_ints, per_token_cast_back
from mooncake.ep.portable_path import COUNT_MESSAGE_BYTES
from mooncake.ep.records import RecordFormat
from mooncake.ep.reference import expert_view_of_tokens, reference_combine, reference_dispatch

RANK_OFFSET = 128
INT32_MASK = (1 << 32) - 1


# ---------------------------------------------------------------------------- inputs


def tokens_on(case: dict, rank: int) -> int:
    tokens = case.get("tokens")
    if tokens is None:
        return case["T"]
    return tokens[rank % len(tokens)]


def make_inputs(
    case: dict, rank: int, seed_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x bf16 [N, H], topk_idx int64 [N, K], topk_weights float32 [N, K]) of ``rank``."""
    num_tokens, hidden, num_experts, topk = tokens_on(case, rank), case["H"], case["E"], case["K"]
    gen = torch.Generator().manual_seed(case.get("seed", 0) * 7919 + rank * 104729 + seed_offset)
    if case.get("structured", True):
        x = torch.full((num_tokens, hidden), rank - RANK_OFFSET, dtype=torch.bfloat16)
        x[:, -128:] = torch.arange(num_tokens, dtype=torch.bfloat16).view(-1, 1)
    else:
        x = (torch.randn((num_tokens, hidden), generator=gen) * 0.1).to(torch.bfloat16)
    scores = torch.randn((num_tokens, num_experts), generator=gen).abs() + 1
    topk_idx = torch.topk(scores, topk, dim=-1).indices
    weights = torch.randn((num_tokens, topk), generator=gen).abs()
    for _ in range(case.get("masked", 0) if num_tokens else 0):
        n = int(torch.randint(num_tokens, (1,), generator=gen))
        k = int(torch.randint(topk, (1,), generator=gen))
        topk_idx[n, k] = -1
    return x, topk_idx.contiguous(), weights.contiguous()


def expert_scale(expert: int) -> float:
    """Each expert multiplies by a distinct exact binary fraction, so misrouted rows show."""
    return 1.0 + (expert % 4) * 0.25


def apply_expert(expert: int, rows: torch.Tensor) -> torch.Tensor:
    return rows * torch.tensor(expert_scale(expert), dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- checks


def dequantize(recv_x: Any, use_fp8: bool) -> torch.Tensor:
    if not use_fp8:
        return recv_x.clone()
    data, scales = recv_x
    return per_token_cast_back(data, scales)


def check_dispatch(
    case: dict,
    rank: int,
    num_ranks: int,
    result: tuple,
    alive: list[bool],
    stats_tensor: Optional[torch.Tensor],
    seed_offset: int = 0,
) -> list[str]:
    """Exact checks of one dispatch's outputs against the reference."""
    errors: list[str] = []
    name = case["name"]
    recv_x, recv_count, handle = result[0], result[1], result[2]
    tokens, hidden, num_experts = case["T"], case["H"], case["E"]
    use_fp8, round_scale, use_ue8m0 = (
        case.get("use_fp8", False),
        case.get("round_scale", False),
        case.get("use_ue8m0", False),
    )
    num_local = num_experts // num_ranks
    rows = num_ranks * tokens
    src_info, layout_range = handle[0], handle[1]
    inputs = [make_inputs(case, r, seed_offset) for r in range(num_ranks)]
    expected = reference_dispatch(
        [i[0] for i in inputs],
        [i[1] for i in inputs],
        rank,
        num_experts,
        alive,
        use_fp8,
        round_scale,
        use_ue8m0,
    )

    def fail(msg: str) -> None:
        errors.append(f"[{name}] rank {rank}: {msg}")

    # shapes, dtypes and layouts
    if use_fp8:
        data, scales = recv_x
        if (
            data.dtype != torch.float8_e4m3fn
            or tuple(data.shape) != (num_local, rows, hidden)
            or not data.is_contiguous()
        ):
            fail(f"recv data {data.dtype} {tuple(data.shape)} contiguous={data.is_contiguous()}")
        width = num_ue8m0_ints(hidden) if use_ue8m0 else num_scale_groups(hidden)
        want_dtype = torch.int32 if use_ue8m0 else torch.float32
        if scales.dtype != want_dtype or tuple(scales.shape) != (num_local, rows, width):
            fail(
                f"scales {scales.dtype} {tuple(scales.shape)}, want {want_dtype} "
                f"{(num_local, rows, width)}"
            )
        if scales.stride() != (width * rows, 1, rows):
            fail(f"scales strides {scales.stride()} are not column-major {(width * rows, 1, rows)}")
    else:
        data, scales = recv_x, None
        if (
            data.dtype != torch.bfloat16
            or tuple(data.shape) != (num_local, rows, hidden)
            or not data.is_contiguous()
        ):
            fail(f"recv_x {data.dtype} {tuple(data.shape)}")
    if recv_count.dtype != torch.int32 or tuple(recv_count.shape) != (num_local,):
        fail(f"recv_count {recv_count.dtype} {tuple(recv_count.shape)}")
    if src_info.dtype != torch.int32 or tuple(src_info.shape) != (num_local, rows):
        fail(f"src_info {src_info.dtype} {tuple(src_info.shape)}")
    if layout_range.dtype != torch.int64 or tuple(layout_range.shape) != (num_local, num_ranks):
        fail(f"layout_range {layout_range.dtype} {tuple(layout_range.shape)}")
    if tuple(handle[2:]) != (tokens, hidden, num_experts):
        fail(f"handle tail {handle[2:]}")
    if errors:
        return errors

    values = dequantize(recv_x, use_fp8)
    for local, exp in enumerate(expected):
        count = int(recv_count[local])
        want = exp.tokens.numel()
        if count != want:
            fail(f"expert {local}: recv_count {count} != {want}")
            continue
        counts = layout_range[local] & INT32_MASK
        begins = layout_range[local] >> 32
        if not torch.equal(counts, exp.per_source):
            fail(f"expert {local}: layout counts {counts.tolist()} != {exp.per_source.tolist()}")
        if int(counts.sum()) != count:
            fail(f"expert {local}: sum(layout counts) {int(counts.sum())} != recv_count {count}")
        want_begins = exp.per_source.cumsum(0) - exp.per_source
        if not torch.equal(begins, want_begins):
            fail(f"expert {local}: layout begins {begins.tolist()} != {want_begins.tolist()}")
        if stats_tensor is not None and int(stats_tensor[local]) != count * case.get(
            "stats_multiplier", 1
        ):
            fail(f"expert {local}: cumulative stats {int(stats_tensor[local])} != {count}")
        if not torch.equal(src_info[local, :count].to(torch.int64), exp.tokens):
            fail(
                f"expert {local}: src_info {src_info[local, :count].tolist()} != "
                f"{exp.tokens.tolist()}"
            )
        got_data = data[local, :count]
        if use_fp8:
            if not torch.equal(got_data.view(torch.uint8), exp.data.view(torch.uint8)):
                fail(f"expert {local}: FP8 data bytes differ from the contract's cast")
            if not torch.equal(scales[local, :count], exp.scales):
                fail(
                    f"expert {local}: scales differ: {scales[local, :count][:2].tolist()} vs "
                    f"{exp.scales[:2].tolist()}"
                )
        elif not torch.equal(got_data, exp.data):
            fail(f"expert {local}: BF16 rows differ")
        got = values[local, :count]
        if not torch.equal(got, exp.values):
            fail(f"expert {local}: dequantized rows differ from the reference")
        if case.get("structured", True) and not round_scale and count:
            body = got[:, :-128].float()
            want_body = (exp.sources - RANK_OFFSET).float().view(-1, 1).expand_as(body)
            if not torch.equal(body, want_body):
                fail(f"expert {local}: structured body is not rank - 128 per source")
            tail = got[:, -128:].float()
            token_value = exp.tokens.to(torch.bfloat16).float()  # bf16 is exact only up to 256
            if not torch.equal(tail, token_value.view(-1, 1).expand_as(tail)):
                fail(f"expert {local}: structured tail is not the token index")
    return errors


def check_combine(
    case: dict,
    rank: int,
    num_ranks: int,
    combined: torch.Tensor,
    alive: list[bool],
    seed_offset: int = 0,
) -> list[str]:
    errors = []
    use_fp8, round_scale, use_ue8m0 = (
        case.get("use_fp8", False),
        case.get("round_scale", False),
        case.get("use_ue8m0", False),
    )
    x, topk_idx, weights = make_inputs(case, rank, seed_offset)
    num_local = case["E"] // num_ranks
    seen = expert_view_of_tokens(x, use_fp8, round_scale, use_ue8m0)
    want = reference_combine(seen, topk_idx, weights, num_local, alive, apply_expert)
    if combined.dtype != torch.bfloat16 or tuple(combined.shape) != tuple(x.shape):
        return [f"[{case['name']}] rank {rank}: combined {combined.dtype} {tuple(combined.shape)}"]
    if not torch.equal(combined, want):
        diff = (combined.float() - want.float()).abs().max().item() if combined.numel() else 0
        errors.append(
            f"[{case['name']}] rank {rank}: combine differs from the fp32 k-ordered reference (max "
            f"{diff})"
        )
    # The contract's tolerance check (identity-like experts): x * sum of valid weights * expert
    # scale.
    owner_ok = torch.tensor(alive)[(topk_idx.clamp_min(0) // num_local)] & (topk_idx >= 0)
    scale = (
        torch.tensor(
            [[expert_scale(int(e)) for e in row] for row in topk_idx.clamp_min(0)]
        ).view_as(weights)
        if topk_idx.numel()
        else weights
    )
    factor = (weights * scale * owner_ok).sum(dim=1, keepdim=True)
    if x.numel():
        diff = calc_diff(x.float() * factor, combined.float())
        tolerance = 9e-4 if use_fp8 else 1e-5
        if diff >= tolerance:
            errors.append(f"[{case['name']}] rank {rank}: calc_diff {diff:.3g} >= {tolerance}")
    return errors


def expected_routed(
    case: dict, rank: int, num_ranks: int, alive: list[bool]
) -> tuple[int, int, int]:
    """Counted from the inputs: (records this rank sends to other ranks in dispatch, i.e. distinct
    (token, remote owner) pairs; rows it sends back in combine, i.e. other ranks' selections of its
    experts; its selections of live experts)."""
    num_local = case["E"] // num_ranks
    records = selections = returned = 0
    for src in range(num_ranks):
        _, topk_idx, _ = make_inputs(case, src)
        for row in topk_idx.tolist():
            owners = [e // num_local for e in row if e >= 0 and alive[e // num_local]]
            if src == rank:
                selections += len(owners)
                records += len({o for o in owners if o != rank})
            elif alive[src]:
                returned += sum(1 for o in owners if o == rank)
    return records, returned, selections


# ---------------------------------------------------------------------------- one case


def simulated_gemm(recv_x: Any, use_fp8: bool, rank: int, num_local: int) -> torch.Tensor:
    values = dequantize(recv_x, use_fp8)
    for local in range(num_local):
        values[local] = apply_expert(rank * num_local + local, values[local])
    return values


def to_cpu(value: Any) -> Any:
    """Tensors (in nested tuples) copied to the CPU, strides kept (the scales stay column-major)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


def wait(mode: str, event: Any, hook: Any) -> None:
    if mode == "hook":
        hook()
    elif mode == "async":
        event.current_stream_wait()


def run_case(buffer: Any, rank: int, num_ranks: int, case: dict) -> list[str]:
    """One dispatch + combine (``case`` keys: name, T, H, E, K, tokens, structured, masked, seed,
    use_fp8, round_scale, use_ue8m0, mode sync|async|hook, zero_copy, use_out, check_bytes)."""
    errors: list[str] = []
    mode = case.get("mode", "sync")
    use_fp8 = case.get("use_fp8", False)
    num_local = case["E"] // num_ranks
    device = torch.device(case.get("device", "cpu"))
    x, topk_idx, weights = (t.to(device) for t in make_inputs(case, rank))
    active = torch.ones(num_ranks, dtype=torch.int32, device=device)
    alive = [True] * num_ranks
    stats_tensor = torch.zeros(num_local, dtype=torch.int32, device=device)
    before = buffer.stats.snapshot()
    result = buffer.dispatch(
        x,
        topk_idx,
        active,
        case["T"],
        case["E"],
        case.get("timeout_us", -1),
        use_fp8=use_fp8,
        round_scale=case.get("round_scale", False),
        use_ue8m0=case.get("use_ue8m0", False),
        async_finish=mode == "async",
        return_recv_hook=mode == "hook",
        cumulative_local_expert_recv_stats=stats_tensor,
    )
    if mode == "sync" and result[4] is not None:
        errors.append(f"[{case['name']}] hook returned without return_recv_hook")
    if mode == "hook" and not callable(result[4]):
        errors.append(f"[{case['name']}] no hook with return_recv_hook")
    wait(mode, result[3], result[4])
    errors += check_dispatch(case, rank, num_ranks, to_cpu(result), alive, stats_tensor.cpu())
    after_dispatch = buffer.stats.snapshot()

    simulated = simulated_gemm(result[0], use_fp8, rank, num_local)
    out = torch.empty_like(x) if case.get("use_out") else None
    if case.get("zero_copy"):
        buffer.get_next_combine_buffer(result[2])[:, :, :] = simulated
    combined, event, hook = buffer.combine(
        simulated,
        topk_idx,
        weights,
        active,
        case.get("timeout_us", -1),
        result[2],
        zero_copy=case.get("zero_copy", False),
        async_finish=mode == "async",
        return_recv_hook=mode == "hook",
        out=out,
    )
    wait(mode, event, hook)
    if out is not None and combined.data_ptr() != out.data_ptr():
        errors.append(f"[{case['name']}] combine did not write into out")
    errors += check_combine(case, rank, num_ranks, combined.cpu(), alive)
    if case.get("check_bytes", True):
        errors += check_bytes(
            case, rank, num_ranks, before, after_dispatch, buffer.stats.snapshot(), alive
        )
    if active.tolist() != [1] * num_ranks:
        errors.append(f"[{case['name']}] active_ranks changed without failures: {active.tolist()}")
    return errors


def check_bytes(
    case: dict, rank: int, num_ranks: int, before: dict, mid: dict, after: dict, alive: list[bool]
) -> list[str]:
    """Bytes on the wire = routed bytes + bounded metadata; nothing gathered."""
    errors = []
    fmt = RecordFormat.make(
        case["H"],
        case["K"],
        case["E"] // num_ranks,
        case.get("use_fp8", False),
        case.get("use_ue8m0", False),
    )
    records, returned_rows, selections = expected_routed(case, rank, num_ranks, alive)
    d_payload = mid["dispatch_payload_bytes"] - before["dispatch_payload_bytes"]
    d_meta = mid["dispatch_meta_bytes"] - before["dispatch_meta_bytes"]
    c_payload = after["combine_payload_bytes"] - mid["combine_payload_bytes"]
    c_meta = after["combine_meta_bytes"] - mid["combine_meta_bytes"]
    if d_payload != records * fmt.payload_bytes:
        errors.append(
            f"[{case['name']}] rank {rank}: dispatch payload {d_payload} != routed {records} x "
            f"{fmt.payload_bytes}"
        )
    meta_bound = records * (4 + 4 * case["K"] + 8) + COUNT_MESSAGE_BYTES * (num_ranks - 1)
    if d_meta > meta_bound:
        errors.append(
            f"[{case['name']}] rank {rank}: dispatch metadata {d_meta} > bound {meta_bound}"
        )
    if c_payload != returned_rows * 2 * case["H"]:
        errors.append(
            f"[{case['name']}] rank {rank}: combine payload {c_payload} != {returned_rows} x "
            f"{2 * case['H']}"
        )
    if c_meta > COUNT_MESSAGE_BYTES * (num_ranks - 1):
        errors.append(f"[{case['name']}] rank {rank}: combine metadata {c_meta}")
    if mid["dispatch_selections"] - before["dispatch_selections"] != selections:
        errors.append(
            f"[{case['name']}] rank {rank}: selections "
            f"{mid['dispatch_selections'] - before['dispatch_selections']} != {selections}"
        )
    return errors


def run_two_alive(buffer: Any, rank: int, num_ranks: int, case: dict) -> list[str]:
    """Two dispatches alive at once (hooks called in reverse order), then both combines."""
    errors: list[str] = []
    use_fp8 = case.get("use_fp8", False)
    num_local = case["E"] // num_ranks
    active = torch.ones(num_ranks, dtype=torch.int32)
    alive = [True] * num_ranks
    first = make_inputs(case, rank, 0)
    second = make_inputs(case, rank, 1)
    kwargs = {
        "use_fp8": use_fp8,
        "round_scale": case.get("round_scale", False),
        "use_ue8m0": case.get("use_ue8m0", False),
    }
    res_a = buffer.dispatch(
        first[0], first[1], active, case["T"], case["E"], -1, return_recv_hook=True, **kwargs
    )
    res_b = buffer.dispatch(
        second[0], second[1], active, case["T"], case["E"], -1, return_recv_hook=True, **kwargs
    )
    res_b[4]()
    res_a[4]()
    errors += check_dispatch(case, rank, num_ranks, res_a, alive, None, 0)
    errors += check_dispatch(case, rank, num_ranks, res_b, alive, None, 1)
    outs = []
    for res, inp in ((res_a, first), (res_b, second)):
        sim = simulated_gemm(res[0], use_fp8, rank, num_local)
        outs.append(buffer.combine(sim, inp[1], inp[2], active, -1, res[2], return_recv_hook=True))
    for out in reversed(outs):
        out[2]()
    errors += check_combine(case, rank, num_ranks, outs[0][0], alive, 0)
    errors += check_combine(case, rank, num_ranks, outs[1][0], alive, 1)
    # Reproducible: the same combine again gives identical bits.
    sim = simulated_gemm(res_a[0], use_fp8, rank, num_local)
    again = buffer.combine(sim, first[1], first[2], active, -1, res_a[2])[0]
    if not torch.equal(again, outs[0][0]):
        errors.append(f"[{case['name']}] rank {rank}: combine is not bit-reproducible")
    return errors


# ---------------------------------------------------------------------------- entry points (one
# spawn each)


def run_cases(rank: int, world_size: int, port: int, backend: str, cases: list[dict]) -> dict:
    from ep_harness import init_group

    from mooncake.mooncake_ep_buffer import Buffer

    if any(case.get("device") == "cuda" for case in cases):
        torch.cuda.set_device(rank % torch.cuda.device_count())
    group = init_group(rank, world_size, port, backend)
    errors: list[str] = []
    timings = {}
    with Buffer(group) as buffer:
        for case in cases:
            start = time.monotonic()
            try:
                if case.get("update_member"):  # the collective re-exchange, then a normal round
                    buffer.update_ep_member()
                runner = run_two_alive if case.get("two_alive") else run_case
                errors += runner(buffer, rank, world_size, case)
            except Exception:
                errors.append(f"[{case['name']}] rank {rank} raised:\n{traceback.format_exc()}")
            timings[case["name"]] = time.monotonic() - start
        path = (buffer.path.name, buffer.path.reason)
    dist.barrier()
    return {"errors": errors, "timings": timings, "path": path}


def resolve(case: dict, world_size: int) -> dict:
    """Cases name ``L`` (local experts) so one list serves every world size."""
    case = dict(case)
    if "L" in case:
        case["E"] = case.pop("L") * world_size
    return case


def run_matrix(rank: int, world_size: int, port: int, backend: str, cases: list[dict]) -> dict:
    return run_cases(rank, world_size, port, backend, [resolve(c, world_size) for c in cases])


# ---------------------------------------------------------------------------- bad inputs


def bad_dispatch_inputs(num_ranks: int) -> list[tuple[str, type, str, dict]]:
    """(label, exception type, text the message must contain, overrides of a good dispatch call)."""
    H, E, K, N = 256, 2 * num_ranks, 2, 4
    x = torch.ones((N, H), dtype=torch.bfloat16)
    topk = torch.stack([torch.arange(K) for _ in range(N)]).to(torch.int64)
    return [
        (
            "hidden not multiple of 128",
            ValueError,
            "multiple of 128",
            {"x": torch.ones((N, 200), dtype=torch.bfloat16)},
        ),
        ("top-k 17", ValueError, "K <= 16", {"topk_idx": torch.zeros((N, 17), dtype=torch.int64)}),
        ("T 1025", ValueError, "<= 1024", {"num_max_dispatch_tokens_per_rank": 1025}),
        (
            "T 0",
            ValueError,
            "1 <= num_max_dispatch_tokens_per_rank",
            {"num_max_dispatch_tokens_per_rank": 0},
        ),
        ("N > T", ValueError, "N <= T", {"num_max_dispatch_tokens_per_rank": 3}),
        (
            "E not multiple of R",
            ValueError,
            "multiple of the number of ranks",
            {"num_experts": E + 1} if num_ranks > 1 else {"num_experts": 0},
        ),
        ("x float32", TypeError, "x must have dtype torch.bfloat16", {"x": x.float()}),
        (
            "x not contiguous",
            ValueError,
            "x must be contiguous",
            {"x": torch.ones((H, N), dtype=torch.bfloat16).t()},
        ),
        (
            "topk int32",
            TypeError,
            "topk_idx must have dtype torch.int64",
            {"topk_idx": topk.to(torch.int32)},
        ),
        ("topk rows != N", ValueError, "topk_idx must have shape", {"topk_idx": topk[:2]}),
        (
            "expert id == E",
            ValueError,
            "num_experts=",
            {"topk_idx": torch.full((N, K), E, dtype=torch.int64)},
        ),
        (
            "expert id -2",
            ValueError,
            "entry -2",
            {"topk_idx": torch.full((N, K), -2, dtype=torch.int64)},
        ),
        ("expert twice", ValueError, "twice", {"topk_idx": torch.zeros((N, K), dtype=torch.int64)}),
        (
            "active_ranks too short",
            ValueError,
            f"it needs at least R entries (shape [{num_ranks}]",
            {"active_ranks": torch.ones(num_ranks - 1, dtype=torch.int32)},
        ),
        (
            "active_ranks 2-D",
            ValueError,
            "active_ranks must have shape [*]",
            {"active_ranks": torch.ones((1, num_ranks), dtype=torch.int32)},
        ),
        (
            "active_ranks dtype",
            TypeError,
            "active_ranks must have dtype torch.int32",
            {"active_ranks": torch.ones(num_ranks, dtype=torch.int64)},
        ),
        (
            "ue8m0 without round_scale",
            ValueError,
            "use_ue8m0=True requires round_scale=True",
            {"use_ue8m0": True},
        ),
        (
            "round_scale without fp8",
            ValueError,
            "round_scale=True requires use_fp8=True",
            {"use_fp8": False, "round_scale": True},
        ),
        (
            "async and hook",
            ValueError,
            "cannot be combined",
            {"async_finish": True, "return_recv_hook": True},
        ),
        ("timeout -5", ValueError, "timeout_us=-5", {"timeout_us": -5}),
        ("timeout float", TypeError, "timeout_us must be an int", {"timeout_us": 1.5}),
        (
            "stats shape",
            ValueError,
            "cumulative_local_expert_recv_stats must have shape",
            {"cumulative_local_expert_recv_stats": torch.zeros(E, dtype=torch.int32)},
        ),
        ("use_fp8 not bool", TypeError, "use_fp8 must be a bool", {"use_fp8": 1}),
    ]


def run_bad_inputs(rank: int, world_size: int, port: int, backend: str) -> dict:
    """Every bad argument raises on every rank, sends nothing, and leaves the ranks in step."""
    from ep_harness import init_group

    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    errors: list[str] = []
    T, H, E, K, N = 8, 256, 2 * world_size, 2, 4
    good = {
        "x": torch.ones((N, H), dtype=torch.bfloat16),
        "topk_idx": torch.stack([torch.arange(K) for _ in range(N)]).to(torch.int64),
        "active_ranks": torch.ones(world_size, dtype=torch.int32),
        "num_max_dispatch_tokens_per_rank": T,
        "num_experts": E,
        "timeout_us": -1,
        "use_fp8": True,
    }
    buffer = Buffer(group)
    before = buffer.stats.snapshot()
    start = time.monotonic()
    for label, exc_type, text, override in bad_dispatch_inputs(world_size):
        try:
            buffer.dispatch(**{**good, **override})
            errors.append(f"dispatch {label}: no exception")
        except exc_type as exc:
            if text not in str(exc):
                errors.append(f"dispatch {label}: message {str(exc)!r} lacks {text!r}")
        except Exception as exc:
            errors.append(
                f"dispatch {label}: {type(exc).__name__} {exc} instead of {exc_type.__name__}"
            )
    # One good dispatch, then bad combines against its handle.
    recv_x, _, handle, _, _ = buffer.dispatch(**{**good, "use_fp8": False})
    w = torch.ones((N, K), dtype=torch.float32)
    good_c = {
        "x": recv_x,
        "topk_idx": good["topk_idx"],
        "topk_weights": w,
        "active_ranks": good["active_ranks"],
        "timeout_us": -1,
        "handle": handle,
    }
    bad_combines = [
        ("x shape", ValueError, "x must have shape", {"x": recv_x[:, :1]}),
        (
            "weights float64",
            TypeError,
            "topk_weights must have dtype torch.float32",
            {"topk_weights": w.double()},
        ),
        (
            "weights shape",
            ValueError,
            "topk_weights must have shape",
            {"topk_weights": w[:, :1].contiguous()},
        ),
        ("handle not tuple", TypeError, "handle must be", {"handle": handle[:3]}),
        ("handle T", ValueError, "handle[2]", {"handle": (handle[0], handle[1], 0, H, E)}),
        (
            "out shape",
            ValueError,
            "out must have shape",
            {"out": torch.empty((N + 1, H), dtype=torch.bfloat16)},
        ),
        (
            "async and hook",
            ValueError,
            "cannot be combined",
            {"async_finish": True, "return_recv_hook": True},
        ),
        ("zero_copy without buffer", ValueError, "get_next_combine_buffer", {"zero_copy": True}),
        (
            "active_ranks too short",
            ValueError,
            "at least R entries",
            {"active_ranks": torch.ones(world_size - 1, dtype=torch.int32)},
        ),
    ]
    mid = buffer.stats.snapshot()
    for label, exc_type, text, override in bad_combines:
        try:
            buffer.combine(**{**good_c, **override})
            errors.append(f"combine {label}: no exception")
        except exc_type as exc:
            if text not in str(exc):
                errors.append(f"combine {label}: message {str(exc)!r} lacks {text!r}")
        except Exception as exc:
            errors.append(
                f"combine {label}: {type(exc).__name__} {exc} instead of {exc_type.__name__}"
            )
    if buffer.stats.snapshot() != mid:
        errors.append(f"bad combines sent bytes: {mid} -> {buffer.stats.snapshot()}")
    combined = buffer.combine(**good_c)[0]
    if not torch.equal(combined, (good["x"].float() * K).to(torch.bfloat16)):
        errors.append("the good combine after bad inputs is wrong")
    after = buffer.stats.snapshot()
    if (
        after["dispatch_ops"] - before["dispatch_ops"] != 1
        or after["combine_ops"] - before["combine_ops"] != 1
    ):
        errors.append(f"bad inputs reached the wire: {before} -> {after}")
    hint_errors = []
    for args in ((0, H, 2, 4), (8, 100, 2, 4), (8, H, 2, 5), (2048, H, 2, 4), (8, H, 0, 4)):
        try:
            Buffer.get_ep_buffer_size_hint(*args)
            hint_errors.append(args)
        except ValueError:
            pass
    if hint_errors:
        errors.append(f"size hint accepted {hint_errors}")
    elapsed = time.monotonic() - start
    buffer.destroy()
    dist.barrier()
    return {"errors": errors, "elapsed": elapsed}


def one_bad_rank_scenarios(world_size: int) -> list[dict]:
    """Ops where only some ranks pass a bad argument: ``bad`` maps rank -> (overrides, exception
    type, text of its own message, ``Limit`` name the others must get)."""
    T, H, K, E = 8, 256, 2, 2 * world_size
    last = world_size - 1
    scenarios = [
        {
            "name": "dispatch N > T on one rank",
            "op": "dispatch",
            "bad": {last: ({"tokens": T + 1}, ValueError, "N <= T", "TOKENS")},
        },
        {
            "name": "dispatch expert id == E on one rank",
            "op": "dispatch",
            "bad": {0: ({"expert": E}, ValueError, f"num_experts={E}", "EXPERT_ID")},
        },
        {
            "name": "dispatch expert twice on one rank",
            "op": "dispatch",
            "bad": {last: ({"twice": True}, ValueError, "twice", "EXPERT_TWICE")},
        },
        {
            "name": "dispatch x float32 on one rank",
            "op": "dispatch",
            "bad": {last: ({"x_dtype": torch.float32}, TypeError, "dtype", "ARGUMENT")},
        },
        {
            "name": "combine weights shape on one rank",
            "op": "combine",
            "bad": {
                0: ({"weights_cols": 1}, ValueError, "topk_weights must have shape", "ARGUMENT")
            },
        },
        {
            "name": "combine N > T on one rank",
            "op": "combine",
            "bad": {last: ({"tokens": T + 1}, ValueError, "N <= T", "TOKENS")},
        },
    ]
    if world_size >= 3:
        scenarios.append(
            {
                "name": "dispatch two bad ranks",
                "op": "dispatch",
                "bad": {
                    1: ({"tokens": T + 1}, ValueError, "N <= T", "TOKENS"),
                    2: ({"expert": -2}, ValueError, "entry -2", "EXPERT_ID"),
                },
            }
        )
    for sc in scenarios:
        sc.update(T=T, H=H, K=K, E=E)
    return scenarios


def _routing(num_tokens: int, rank: int, K: int, E: int) -> torch.Tensor:
    n = torch.arange(num_tokens, dtype=torch.int64).unsqueeze(1)
    return (n * 3 + rank + torch.arange(K, dtype=torch.int64)) % E


def run_one_bad_rank(rank: int, world_size: int, port: int, backend: str) -> dict:
    """One rank (or two) violates a limit, the others do not: every rank raises (the bad ones their
    own error, the others ``PeerArgumentError`` naming the rank and the limit) at once, nothing is
    sent or marked failed, and the next round works."""
    from ep_harness import init_group

    from mooncake.ep.limits import Limit, PeerArgumentError
    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    errors: list[str] = []
    timeout_us = 20_000_000  # a rank that waited for the bad one would take this long
    elapsed: dict[str, float] = {}
    buffer = Buffer(group)
    active = torch.ones(world_size, dtype=torch.int32)

    def good_round(label: str, T: int, H: int, K: int, E: int) -> Any:
        x = torch.full((T, H), float(rank + 1), dtype=torch.bfloat16)
        topk = _routing(T, rank, K, E)
        recv_x, _, handle, _, _ = buffer.dispatch(x, topk, active, T, E, timeout_us, use_fp8=False)
        w = torch.ones((T, K), dtype=torch.float32)
        combined = buffer.combine(recv_x, topk, w, active, timeout_us, handle)[0]
        if not torch.equal(combined, (x.float() * K).to(torch.bfloat16)):
            errors.append(f"[{label}] rank {rank}: the good round after it is wrong")
        if active.tolist() != [1] * world_size:
            errors.append(f"[{label}] rank {rank}: active_ranks {active.tolist()}")
        return handle

    for sc in one_bad_rank_scenarios(world_size):
        label, T, H, K, E = sc["name"], sc["T"], sc["H"], sc["K"], sc["E"]
        handle = good_round(label + " (before)", T, H, K, E) if sc["op"] == "combine" else None
        mine = sc["bad"].get(rank)
        bad = mine[0] if mine else {}
        before = buffer.stats.snapshot()
        n = bad.get("tokens", T)
        x = torch.full((n, H), float(rank + 1), dtype=bad.get("x_dtype", torch.bfloat16))
        topk = _routing(n, rank, K, E)
        if "expert" in bad:
            topk[n // 2, 0] = bad["expert"]
        if bad.get("twice"):
            topk[1, 1] = topk[1, 0]
        start = time.monotonic()
        try:
            if sc["op"] == "dispatch":
                buffer.dispatch(x, topk, active, T, E, timeout_us, use_fp8=False)
            else:
                w = torch.ones((n, bad.get("weights_cols", K)), dtype=torch.float32)
                recv_x = torch.zeros((E // world_size, world_size * T, H), dtype=torch.bfloat16)
                buffer.combine(recv_x, topk, w, active, timeout_us, handle)
            errors.append(f"[{label}] rank {rank}: no exception")
        except Exception as exc:
            if mine:
                exc_type, text = mine[1], mine[2]
                if type(exc) is not exc_type or text not in str(exc):
                    errors.append(f"[{label}] rank {rank} (bad): {type(exc).__name__}: {exc}")
            else:
                first = min(sc["bad"])
                want = Limit[sc["bad"][first][3]]
                if not isinstance(exc, PeerArgumentError) or not isinstance(exc, ValueError):
                    errors.append(f"[{label}] rank {rank}: {type(exc).__name__}: {exc}")
                elif exc.rank != first or exc.limit != want or exc.ranks != sorted(sc["bad"]):
                    errors.append(
                        f"[{label}] rank {rank}: got rank {exc.rank} {exc.limit!r} "
                        f"ranks {exc.ranks}, want {first} {want!r}: {exc}"
                    )
                elif f"rank {first}" not in str(exc):
                    errors.append(f"[{label}] rank {rank}: message lacks the rank: {exc}")
        elapsed[label] = time.monotonic() - start
        if elapsed[label] > 5:
            errors.append(f"[{label}] rank {rank}: took {elapsed[label]:.1f} s (someone waited)")
        after = buffer.stats.snapshot()
        if after != before:
            errors.append(f"[{label}] rank {rank}: bytes went out: {before} -> {after}")
        if active.tolist() != [1] * world_size:
            errors.append(f"[{label}] rank {rank}: active_ranks {active.tolist()} after the raise")
        good_round(label + " (after)", T, H, K, E)
    buffer.destroy()
    dist.barrier()
    return {"errors": errors, "elapsed": elapsed}


def run_validation_cache(rank: int, world_size: int, port: int, backend: str) -> dict:
    """Buffer skips its checks for an argument signature it validated before: every change after
    the steady state (dtype, layout, shape, device, the type of a scalar, flags, timeout, expert
    values) is still caught, on every rank, and good calls keep working."""
    from ep_harness import init_group

    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    errors: list[str] = []
    T, H, E, K, N = 8, 256, 2 * world_size, 2, 6
    x = torch.full((N, H), float(rank + 1), dtype=torch.bfloat16)
    topk = _routing(N, rank, K, E)
    good = {
        "x": x,
        "topk_idx": topk,
        "active_ranks": torch.ones(world_size, dtype=torch.int32),
        "num_max_dispatch_tokens_per_rank": T,
        "num_experts": E,
        "timeout_us": 10_000_000,
        "use_fp8": False,
    }
    buffer = Buffer(group)

    def good_round(label: str) -> tuple:
        recv_x, _, handle, _, _ = buffer.dispatch(**good)
        w = torch.ones((N, K), dtype=torch.float32)
        out = buffer.combine(recv_x, topk, w, good["active_ranks"], 10_000_000, handle)[0]
        if not torch.equal(out, (x.float() * K).to(torch.bfloat16)):
            errors.append(f"[{label}] rank {rank}: wrong combine")
        return recv_x, handle

    for i in range(3):  # the steady state: the same signature again and again
        recv_x, handle = good_round(f"warm-up {i}")
    if len(buffer._dispatch_ok) != 1 or len(buffer._combine_ok) != 1:
        errors.append(f"signatures cached: {len(buffer._dispatch_ok)}, {len(buffer._combine_ok)}")
    twice = topk.clone()
    twice[2, 1] = twice[2, 0]
    bad_dispatch = [
        ("x float32", TypeError, "x must have dtype", {"x": x.float()}),
        ("x strided", ValueError, "contiguous", {"x": torch.ones((H, N)).bfloat16().t()}),
        ("x N > T", ValueError, "N <= T", {"x": torch.ones((T + 1, H), dtype=torch.bfloat16)}),
        ("topk int32", TypeError, "topk_idx must have dtype", {"topk_idx": topk.int()}),
        ("active int64", TypeError, "active_ranks", {"active_ranks": torch.ones(world_size)}),
        ("use_fp8 int", TypeError, "use_fp8 must be a bool", {"use_fp8": 0}),
        ("T float", TypeError, "must be an int", {"num_max_dispatch_tokens_per_rank": float(T)}),
        ("E float", TypeError, "num_experts must be an int", {"num_experts": float(E)}),
        ("timeout -5", ValueError, "timeout_us=-5", {"timeout_us": -5}),
        ("timeout float", TypeError, "timeout_us must be an int", {"timeout_us": 1e7}),
        ("expert id E", ValueError, "entry", {"topk_idx": torch.full((N, K), E)}),
        ("expert twice", ValueError, "twice", {"topk_idx": twice}),
        ("ue8m0 alone", ValueError, "requires", {"use_fp8": True, "use_ue8m0": True}),
    ]
    w = torch.ones((N, K), dtype=torch.float32)
    good_c = {
        "x": recv_x,
        "topk_idx": topk,
        "topk_weights": w,
        "active_ranks": good["active_ranks"],
        "timeout_us": 10_000_000,
        "handle": handle,
    }
    bad_combine = [
        ("weights float64", TypeError, "topk_weights must", {"topk_weights": w.double()}),
        ("out shape", ValueError, "out must have", {"out": torch.empty((N, 2 * H)).bfloat16()}),
        ("handle T float", TypeError, "must be an int", {"handle": (*handle[:2], float(T), H, E)}),
        ("zero_copy int", TypeError, "zero_copy must be a bool", {"zero_copy": 0}),
        ("hook + async", ValueError, "cannot", {"return_recv_hook": True, "async_finish": True}),
        ("expert id -3", ValueError, "entry -3", {"topk_idx": torch.full((N, K), -3)}),
    ]  # fmt: skip
    for op, cases, base in (("dispatch", bad_dispatch, good), ("combine", bad_combine, good_c)):
        call = buffer.dispatch if op == "dispatch" else buffer.combine
        for label, exc_type, text, override in cases:
            try:
                call(**{**base, **override})
                errors.append(f"[{op} {label}] rank {rank}: no exception")
            except exc_type as exc:
                if text not in str(exc):
                    errors.append(f"[{op} {label}] rank {rank}: {exc!r} lacks {text!r}")
            except Exception as exc:
                errors.append(f"[{op} {label}] rank {rank}: {type(exc).__name__}: {exc}")
            good_round(f"after {op} {label}")
    buffer.destroy()
    dist.barrier()
    return {"errors": errors}


# ---------------------------------------------------------------------------- DeepEP drop-in


def run_deep_ep_script(rank: int, world_size: int, port: int, backend: str) -> dict:
    """A DeepEP low-latency test body, unchanged except for the import line."""
    from ep_harness import init_group

    from mooncake.ep import deep_ep_compat as deep_ep

    group = init_group(rank, world_size, port, backend)
    errors: list[str] = []
    num_tokens, hidden, num_topk, num_experts = 16, 512, 4, 4 * world_size
    num_local_experts = num_experts // world_size
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
        num_tokens, hidden, world_size, num_experts
    )
    buffer = deep_ep.Buffer(
        group,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=num_experts // world_size,
        allow_nvlink_for_low_latency_mode=True,
        explicitly_destroy=True,
    )
    torch.manual_seed(rank)
    x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16) * (rank - 128)
    x[:, -128:] = torch.arange(num_tokens).to(torch.bfloat16).view(-1, 1)
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=True)[1]
    topk_weights = torch.randn((num_tokens, num_topk), dtype=torch.float32).abs()
    topk_idx[0, 0] = -1
    for return_recv_hook in (False, True):
        for use_fp8 in (False, True):
            stats = torch.zeros((num_local_experts,), dtype=torch.int)
            packed_recv_x, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
                x,
                topk_idx,
                num_tokens,
                num_experts,
                use_fp8=use_fp8,
                round_scale=False,
                use_ue8m0=False,
                cumulative_local_expert_recv_stats=stats,
                async_finish=not return_recv_hook,
                return_recv_hook=return_recv_hook,
            )
            hook() if return_recv_hook else event.current_stream_wait()
            if use_fp8:
                sim = per_token_cast_back(
                    packed_recv_x[0].view(-1, hidden),
                    packed_recv_x[1].contiguous().view(-1, hidden // 128),
                )
                sim = sim.view(packed_recv_x[0].shape)
            else:
                sim = packed_recv_x.clone()
            if not torch.equal(stats, packed_recv_count):
                errors.append(f"stats {stats.tolist()} != recv_count {packed_recv_count.tolist()}")
            for zero_copy in (False, True):
                if zero_copy:
                    buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = sim
                out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16)
                combined_x, event, hook = buffer.low_latency_combine(
                    sim,
                    topk_idx,
                    topk_weights,
                    handle,
                    use_logfmt=False,
                    async_finish=not return_recv_hook,
                    zero_copy=zero_copy,
                    return_recv_hook=return_recv_hook,
                    out=out,
                )
                hook() if return_recv_hook else event.current_stream_wait()
                diff = calc_diff(
                    x * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1),
                    combined_x,
                )
                if not diff < (9e-4 if use_fp8 else 1e-5):
                    errors.append(
                        f"combine diff {diff} (fp8={use_fp8}, hook={return_recv_hook}, "
                        f"zero_copy={zero_copy})"
                    )
    if buffer.active_ranks.tolist() != [1] * world_size:
        errors.append(f"active_ranks {buffer.active_ranks.tolist()}")
    buffer.clean_low_latency_buffer(num_tokens, hidden, num_experts)
    try:
        buffer.get_dispatch_layout(topk_idx, num_experts)
        errors.append("normal mode did not raise")
    except NotImplementedError:
        pass
    buffer.destroy()
    dist.barrier()
    return {"errors": errors}
