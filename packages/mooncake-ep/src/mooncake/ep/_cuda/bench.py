"""Kernel timing of the fast path on one GPU with one rank: ``python -m mooncake.ep._cuda.bench``.

DeepEP's low-latency shape by default (128 tokens, hidden 7168, top-8, 288 experts, FP8 dispatch,
BF16 combine). Reports, each over ``--iters`` iterations with L2 flushed before each:

- kernel times from the profiler (fused dispatch and combine; with ``return_recv_hook`` the send and
  receive kernels separately), median and mean;
- end to end: CUDA events around the Python calls ``dispatch`` + ``combine`` through ``Buffer``
  (synchronised after the flush, so the Python time counts);
- logical bandwidth (dispatch bytes = selections x (H + H/128*4 + 16), combine bytes =
  selections x 2H, over the kernel time) and its fraction of the HBM bandwidth measured here
  (device-to-device copy, bytes read + written);
- phase timestamps inside the fused kernels (%globaltimer per block);
- host costs: the two Python calls through ``Buffer`` and straight on the path, each op's call
  alone, the launch (``mep_dispatch`` of an empty phase through ctypes) and its parts measured in C
  (``mep_bench_launch`` of the separate benchmark library ``_mooncake_ep_bench.so``: the device
  guard, the capture query, empty kernels through the runtime and the driver API), and the
  end-to-end time with runtime launches for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _init_single_rank() -> Any:
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="mooncake-ep-bench-"), "store"), 1)
    dist.init_process_group(
        "gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    return dist.group.WORLD


def _hbm_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[2:])


def _kernel_times(prof: Any, name: str) -> list[float]:
    """Durations (us) of the kernels whose name contains ``name``, in start order."""
    events = []
    for evt in prof.events():
        if name in evt.name and str(getattr(evt, "device_type", "")).endswith("CUDA"):
            rng = evt.time_range
            events.append((rng.start, rng.end - rng.start))
    events.sort()
    return [d for _, d in events]


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mooncake.ep._cuda.bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=288)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument(
        "--e2e-iters",
        type=int,
        default=200,
        help="samples of the end-to-end median (the host's noise moves it between blocks of 50)",
    )
    ap.add_argument("--bf16-dispatch", action="store_true", help="dispatch BF16 instead of FP8")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--profile-host", default="", help="write a cProfile of the Python calls here")
    args = ap.parse_args(argv)

    from mooncake.ep.buffer import Buffer

    torch.cuda.set_device(0)
    group = _init_single_rank()
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    use_fp8 = not args.bf16_dispatch
    buffer = Buffer(group, Buffer.get_ep_buffer_size_hint(T, H, 1, E), path="fast")
    path = buffer.path
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn((T, H), device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    scores = torch.randn((T, E), device="cuda", generator=gen).abs() + 1
    topk_idx = torch.topk(scores, K, dim=-1).indices.contiguous()
    weights = torch.rand((T, K), device="cuda", generator=gen)
    active = torch.ones(1, dtype=torch.int32, device="cuda")
    expert_out = torch.randn((E, T, H), device="cuda", generator=gen).to(torch.bfloat16)
    flush = torch.empty(int(256e6 // 4), dtype=torch.int32, device="cuda")
    selections = int((topk_idx >= 0).sum())
    timeout_us = 10_000_000

    def pair(hook: bool) -> Any:
        recv = buffer.dispatch(
            x, topk_idx, active, T, E, timeout_us, use_fp8=use_fp8, return_recv_hook=hook
        )
        if hook:
            recv[4]()
        out = buffer.combine(
            expert_out, topk_idx, weights, active, timeout_us, recv[2], return_recv_hook=hook
        )
        if hook:
            out[2]()
        return recv, out

    def e2e_times(host: Any = None, iters: int = args.iters) -> list[float]:
        """Per iteration, the CUDA-event us around ``pair(False)``, L2 flushed first (``host``: a
        list that gets the host us of each ``pair`` too)."""
        times = []
        for _ in range(iters):
            flush.zero_()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if host is None:
                pair(False)
            else:
                t0 = time.perf_counter()
                pair(False)
                host.append((time.perf_counter() - t0) * 1e6)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return times

    # Warm-up and a sanity check against the identity expert (combine = x * sum(weights) for BF16).
    for _ in range(5):
        pair(False)
    torch.cuda.synchronize()

    from torch.profiler import ProfilerActivity, profile

    shape = {"tokens": T, "hidden": H, "topk": K, "experts": E, "fp8_dispatch": use_fp8}
    results: dict[str, Any] = {
        "shape": shape,
        "device": torch.cuda.get_device_name(0),
        "path": path.name,
    }
    for hook in (False, True):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                flush.zero_()
                pair(hook)
            torch.cuda.synchronize()
        d = _kernel_times(prof, "dispatch_kernel")
        c = _kernel_times(prof, "combine_kernel")
        if hook:
            results["dispatch_send_us"] = statistics.median(d[0::2])
            results["dispatch_recv_us"] = statistics.median(d[1::2])
            results["combine_send_us"] = statistics.median(c[0::2])
            results["combine_recv_us"] = statistics.median(c[1::2])
        else:
            results["dispatch_us"] = statistics.median(d)
            results["dispatch_mean_us"] = statistics.mean(d)
            results["combine_us"] = statistics.median(c)
            results["combine_mean_us"] = statistics.mean(c)

    e2e = e2e_times(iters=args.e2e_iters)
    results["e2e_mean_us"] = statistics.mean(e2e)
    results["e2e_median_us"] = statistics.median(e2e)
    results["e2e_best_us"] = min(e2e)
    results["e2e_samples_us"] = [round(t, 2) for t in e2e]
    results["e2e_first50_median_us"] = statistics.median(e2e[:50])  # as with --e2e-iters 50
    # The same measurement twice more: the spread between runs of the same code.
    results["e2e_repeat_medians_us"] = [statistics.median(e2e_times()) for _ in range(2)]

    # Host time of the two Python calls alone (no sync in between), to split API overhead.
    host = []
    for _ in range(args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pair(False)
        host.append((time.perf_counter() - t0) * 1e6)
    results["python_calls_host_us"] = statistics.median(host)

    # Each call alone (dispatch's host time delays both kernels; combine's is hidden while it is
    # shorter than the dispatch kernel), after different waits: a plain synchronize (as above),
    # the e2e loop's (L2 flush, synchronize, start event), and the flush waited for by polling.
    def flush_sync() -> None:
        flush.zero_()
        torch.cuda.synchronize()

    def flush_sync_event() -> None:
        flush_sync()
        torch.cuda.Event(enable_timing=True).record()

    def flush_poll() -> None:
        flush.zero_()
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            pass

    waits = {
        "sync": torch.cuda.synchronize,
        "flush_sync": flush_sync,
        "flush_sync_event": flush_sync_event,
        "flush_poll": flush_poll,
    }
    split: dict[str, list[float]] = {}
    for name, wait in waits.items():
        d_host, c_host = [], []
        for _ in range(args.iters):
            wait()
            t0 = time.perf_counter()
            recv = buffer.dispatch(x, topk_idx, active, T, E, timeout_us, use_fp8=use_fp8)
            t1 = time.perf_counter()
            buffer.combine(expert_out, topk_idx, weights, active, timeout_us, recv[2])
            t2 = time.perf_counter()
            d_host.append((t1 - t0) * 1e6)
            c_host.append((t2 - t1) * 1e6)
        split[name] = [round(statistics.median(d_host), 2), round(statistics.median(c_host), 2)]
    torch.cuda.synchronize()
    results["host_split_us"] = split  # wait -> [dispatch call, combine call]
    results["dispatch_call_host_us"], results["combine_call_host_us"] = split["sync"]

    # The same two calls straight on the path (no Buffer argument validation).

    def pair_direct() -> None:
        recv = path.dispatch(
            x, topk_idx, active, T, E, timeout_us, use_fp8, False, False, False, False, None
        )
        path.combine(
            expert_out, topk_idx, weights, active, timeout_us, recv[2], False, False, False, None
        )
        buffer.num_ops += 2

    direct = []
    for _ in range(args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pair_direct()
        direct.append((time.perf_counter() - t0) * 1e6)
    results["path_calls_host_us"] = statistics.median(direct)
    # Phase timestamps (%globaltimer per block, fused kernels): where the kernel time goes.
    grid = path.grid
    traces = [torch.zeros(grid * 16, dtype=torch.int64, device="cuda") for _ in range(2)]
    path._lib.mep_ctx_set_trace(path._ctx, traces[0].data_ptr(), traces[1].data_ptr())
    phase_rows: dict[str, list] = {"dispatch": [], "combine": []}
    for _ in range(20):
        for t in traces:
            t.zero_()
        flush.zero_()
        pair(False)
        torch.cuda.synchronize()
        for name, t in zip(("dispatch", "combine"), traces):
            ts = t.view(grid, 16).cpu()
            rel = (ts - int(ts[:, 0].min())).double() / 1e3  # us since the first block started
            phase_rows[name].append(
                [
                    (float(rel[:, i].median()), float(rel[:, i].max()))
                    if bool((ts[:, i] > 0).all())
                    else None
                    for i in range(16)
                ]
            )
    path._lib.mep_ctx_set_trace(path._ctx, 0, 0)
    results["phases_us"] = {}
    for name, rows_ in phase_rows.items():
        points = []
        for i in range(16):
            vals = [r[i] for r in rows_ if r[i] is not None]
            points.append(
                None
                if not vals
                else (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
            )
        results["phases_us"][name] = points

    # Fixed cost: the same launch with no phase (the kernel reads its state and exits).
    import ctypes
    from functools import partial

    from mooncake.ep import _cuda, fast_path

    lib, ctx = path._lib, path._ctx
    ctx_arg = ctypes.c_void_p(ctx)
    last_args = next(iter(path._dispatch_entries.values()))[4]  # the default shape's, filled
    empty_args = _cuda.MepOpArgs.from_buffer_copy(last_args)
    empty_args.phases = 0
    empty_ref = ctypes.byref(empty_args)

    def launch_times() -> list[float]:
        """Per iteration, host us of launching the empty dispatch kernel."""
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            lib.mep_dispatch(ctx_arg, empty_ref)
            times.append((time.perf_counter() - t0) * 1e6)
        return times

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            lib.mep_dispatch(ctx_arg, empty_ref)
        torch.cuda.synchronize()
    results["empty_kernel_us"] = statistics.median(_kernel_times(prof, "dispatch_kernel"))
    results["launch_host_us"] = statistics.median(launch_times())
    # The ctypes round trip alone (a library call that does no CUDA work).
    calls = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        lib.mep_ctx_num_sms(ctx)
        calls.append((time.perf_counter() - t0) * 1e6)
    results["ctypes_call_us"] = statistics.median(calls)
    # The launch's parts, timed in C (mean us over 200 iterations, median of 3 runs) by the
    # benchmark library (_mooncake_ep_bench.so; the production library has no bench code).
    bench_lib = _cuda.load_bench()
    modes = [
        "timer", "device_guard_v1", "launch_scope", "capture_query", "empty_kernel_plain",
        "empty_params_runtime", "empty_params_driver", "dispatch_runtime", "dispatch_driver",
        "dispatch_after_idle",
    ]  # fmt: skip
    results["launch_api"] = "driver" if lib.mep_ctx_launch_api(ctx) else "runtime"
    c_parts: dict[str, Any] = {}
    for mode, name in enumerate(modes):
        runs = []
        for _ in range(3):
            out = ctypes.c_double()
            rc = bench_lib.mep_bench_launch(ctx, mode, 200, empty_ref, ctypes.byref(out))
            runs.append(out.value if rc == 0 else None)
        ok = [r for r in runs if r is not None]
        c_parts[name] = statistics.median(ok) if ok else None
    results["c_launch_parts_us"] = c_parts

    # Python-side pieces of an op (us per call, median of 5 runs of 2000 calls).
    def per_call_us(fn: Any, n: int = 2000) -> float:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
        return statistics.median(runs)

    small = torch.zeros(16, device="cuda")
    results["py_parts_us"] = {
        "is_current_stream_capturing": per_call_us(fast_path._stream_capturing),
        "current_raw_stream": per_call_us(partial(fast_path._current_raw_stream, 0)),
        "torch_small_kernel_launch": per_call_us(small.zero_, 200),
        "x_get_device": per_call_us(x.get_device),
        "x_data_ptr": per_call_us(x.data_ptr),
        "python_noop_call": per_call_us(lambda: None),
    }

    # Non-cooperative launches, for comparison (host cost of the launch and end-to-end time).
    lib.mep_ctx_set_cooperative(ctx, 0)
    torch.cuda.synchronize()
    results["launch_host_noncoop_us"] = statistics.median(launch_times())
    results["e2e_noncoop_median_us"] = statistics.median(e2e_times())
    lib.mep_ctx_set_cooperative(ctx, 1)
    torch.cuda.synchronize()
    # Runtime launches (cudaLaunchKernelExC: the kernel looked up on every call), for comparison.
    if results["launch_api"] == "driver":
        lib.mep_ctx_set_launch_api(ctx, 0)
        torch.cuda.synchronize()
        results["launch_host_runtime_us"] = statistics.median(launch_times())
        results["e2e_runtime_launch_median_us"] = statistics.median(e2e_times())
        lib.mep_ctx_set_launch_api(ctx, 1)
        torch.cuda.synchronize()

    if args.profile_host:
        import cProfile
        import io
        import pstats

        prof_host = cProfile.Profile()
        torch.cuda.synchronize()
        prof_host.enable()
        for _ in range(200):
            pair(False)
            torch.cuda.synchronize()
        prof_host.disable()
        text = io.StringIO()
        pstats.Stats(prof_host, stream=text).sort_stats("tottime").print_stats(30)
        with open(args.profile_host, "w") as f:
            f.write(text.getvalue())

    # Spread over time: blocks of the e2e measurement with the host time of the calls inside.
    t_start = time.perf_counter()
    blocks = []
    for _ in range(6):
        host_in: list[float] = []
        at = time.perf_counter() - t_start
        block = e2e_times(host_in)
        blocks.append(
            {
                "at_s": round(at, 3),
                "e2e_median_us": round(statistics.median(block), 2),
                "e2e_best_us": round(min(block), 2),
                "host_median_us": round(statistics.median(host_in), 2),
                "host_best_us": round(min(host_in), 2),
            }
        )
    results["e2e_blocks"] = blocks

    hbm = _hbm_bandwidth()
    d_bytes = selections * ((H + H // 128 * 4 + 16) if use_fp8 else (2 * H + 16))
    c_bytes = selections * 2 * H
    results.update(
        selections=selections,
        hbm_copy_GBps=hbm / 1e9,
        dispatch_logical_GBps=d_bytes / (results["dispatch_us"] * 1e-6) / 1e9,
        combine_logical_GBps=c_bytes / (results["combine_us"] * 1e-6) / 1e9,
    )
    results["dispatch_hbm_fraction"] = results["dispatch_logical_GBps"] * 1e9 / hbm
    results["combine_hbm_fraction"] = results["combine_logical_GBps"] * 1e9 / hbm
    results["kernel_error_flags"] = buffer.path.error_flags()

    r = results
    rows = [
        (
            "dispatch kernel (median / mean)",
            f"{r['dispatch_us']:.1f} / {r['dispatch_mean_us']:.1f} us",
            "<= 15 us",
        ),
        (
            "combine kernel (median / mean)",
            f"{r['combine_us']:.1f} / {r['combine_mean_us']:.1f} us",
            "<= 20 us",
        ),
        (
            "dispatch send + recv (hook)",
            f"{r['dispatch_send_us']:.1f} + {r['dispatch_recv_us']:.1f} us",
            "",
        ),
        (
            "combine send + recv (hook)",
            f"{r['combine_send_us']:.1f} + {r['combine_recv_us']:.1f} us",
            "",
        ),
        (
            "dispatch+combine via Python (mean/median/best)",
            f"{r['e2e_mean_us']:.1f} / {r['e2e_median_us']:.1f} / {r['e2e_best_us']:.1f} us "
            f"({len(r['e2e_samples_us'])} samples)",
            "<= 60 us",
        ),
        (
            "empty kernel (same launch, no phase)",
            f"{r['empty_kernel_us']:.1f} us; launch host {r['launch_host_us']:.1f} us "
            f"(non-cooperative {r['launch_host_noncoop_us']:.1f} us, "
            f"e2e {r['e2e_noncoop_median_us']:.1f} us; ctypes call {r['ctypes_call_us']:.1f} us)",
            "",
        ),
        (
            "host time of the two Python calls (Buffer / path)",
            f"{r['python_calls_host_us']:.1f} / {r['path_calls_host_us']:.1f} us "
            f"(dispatch {r['dispatch_call_host_us']:.1f}, combine {r['combine_call_host_us']:.1f})",
            "",
        ),
        (
            "e2e again (medians), with runtime launches",
            ", ".join(f"{v:.1f}" for v in r["e2e_repeat_medians_us"])
            + f" us; {r.get('e2e_runtime_launch_median_us', float('nan')):.1f} us "
            f"(launch host {r.get('launch_host_runtime_us', float('nan')):.1f} us, "
            f"API now {r['launch_api']})",
            "",
        ),
        (
            "dispatch logical bandwidth",
            f"{r['dispatch_logical_GBps']:.0f} GB/s "
            f"({100 * r['dispatch_hbm_fraction']:.1f}% of HBM copy "
            f"{hbm / 1e9:.0f} GB/s)",
            "",
        ),
        (
            "combine logical bandwidth",
            f"{r['combine_logical_GBps']:.0f} GB/s "
            f"({100 * r['combine_hbm_fraction']:.1f}% of HBM copy)",
            "",
        ),
    ]
    kind = "FP8" if use_fp8 else "BF16"
    print(
        f"mooncake-ep fast path bench: {r['device']}, path {r['path']}, T={T} H={H} K={K} E={E} "
        f"{kind} dispatch, BF16 combine, {args.iters} iterations, L2 flushed"
    )
    for name, value, target in rows:
        print(f"  {name:<48} {value:<44} {target}")
    parts = ", ".join(
        f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in r["c_launch_parts_us"].items()
    )
    print(f"  launch parts in C (us): {parts}")
    print(
        "  host us of the dispatch / combine call after each wait: "
        + ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f}" for k, v in r["host_split_us"].items())
    )
    print(
        "  e2e blocks (median/best, host median): "
        + ", ".join(
            f"{b['e2e_median_us']:.1f}/{b['e2e_best_us']:.1f} ({b['host_median_us']:.1f})"
            for b in r["e2e_blocks"]
        )
    )
    print("  Python parts (us): " + ", ".join(f"{k} {v:.2f}" for k, v in r["py_parts_us"].items()))
    for name, points in results["phases_us"].items():
        text = ", ".join(
            f"{i}:{pt[0]:.1f}/{pt[1]:.1f}" for i, pt in enumerate(points) if pt is not None
        )
        print(f"  {name} phases (us since first block start, median/max over blocks): {text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    buffer.destroy()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
