"""GPU benchmark of the host path in the call patterns real clients use (one rank, fast path).

Patterns: DeepEP's ``test_low_latency.py`` loop through the drop-in (FP8 dispatch with cumulative
stats, BF16 combine), the same on ``Buffer``, ``async_finish`` + ``event.current_stream_wait()``
(SGLang), ``return_recv_hook`` + ``hook()``, ``use_logfmt=True``, zero-copy combine, and an
``active_ranks`` longer than R (SGLang's max_ep_size). Each with and without
``torch.set_default_device("cuda")`` (what DeepEP's and Mooncake's tests set). Per pattern: host us
per dispatch+combine (the Python calls alone, median of blocks) and end to end as DeepEP's
``bench`` measures it (CUDA events around each pair, no sync in between, L2 flushed once).

Only public API, so the same script measures an older checkout (``PYTHONPATH=<old src>``):

    MOONCAKE_EP_CUDA_LIB=... PYTHONPATH=packages/mooncake-ep/src \\
        python packages/mooncake-ep/tests/bench_client_patterns.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

T, H, K, E = 128, 7168, 8, 288


def _group() -> Any:
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="ep-client-bench-"), "s"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(60))
    return dist.group.WORLD


def _host_us(pair: Callable[[], None], blocks: int, calls: int) -> float:
    samples = []
    for _ in range(blocks):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            pair()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def _e2e_us(pair: Callable[[], None], iters: int) -> tuple[float, float]:
    """DeepEP's ``bench``: events around each call, no sync in between; (avg, min) without the
    first sample."""
    torch.cuda.synchronize()
    cache = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")
    cache.zero_()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        pair()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)][1:]
    return statistics.mean(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", default="")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    from mooncake.ep import deep_ep_compat as deep_ep

    torch.cuda.set_device(0)
    group = _group()
    compat = deep_ep.Buffer(
        group, num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, 1, E),
        low_latency_mode=True, num_qps_per_rank=E, explicitly_destroy=True,
    )  # fmt: skip
    buffer = compat.mooncake_buffer
    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn((T, H), device=dev, generator=gen) * 0.1).to(torch.bfloat16)
    scores = torch.randn((T, E), device=dev, generator=gen).abs() + 1
    topk = torch.topk(scores, K, dim=-1).indices.contiguous()
    weights = torch.rand((T, K), device=dev, generator=gen)
    active = torch.ones(1, dtype=torch.int32, device=dev)
    long_active = torch.ones(8, dtype=torch.int32, device=dev)
    stats = torch.zeros(E, dtype=torch.int32, device=dev)
    expert_out = torch.randn((E, T, H), device=dev, generator=gen).to(torch.bfloat16)
    timeout_us = 10_000_000

    def compat_sync() -> None:  # DeepEP's test_func(return_recv_hook=False)
        recv = compat.low_latency_dispatch(
            x, topk, T, E, cumulative_local_expert_recv_stats=stats, use_fp8=True,
            async_finish=False, return_recv_hook=False,
        )  # fmt: skip
        compat.low_latency_combine(expert_out, topk, weights, recv[2], use_logfmt=False,
                                   return_recv_hook=False)  # fmt: skip

    def compat_logfmt() -> None:
        recv = compat.low_latency_dispatch(x, topk, T, E, cumulative_local_expert_recv_stats=stats)
        compat.low_latency_combine(expert_out, topk, weights, recv[2], use_logfmt=True)

    def direct(active_ranks: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            recv = buffer.dispatch(x, topk, active_ranks, T, E, timeout_us, use_fp8=True,
                                   cumulative_local_expert_recv_stats=stats)  # fmt: skip
            buffer.combine(expert_out, topk, weights, active_ranks, timeout_us, recv[2])

        return run

    def direct_async() -> None:  # SGLang's dispatcher without the receive hook
        recv = buffer.dispatch(x, topk, active, T, E, timeout_us, use_fp8=True, async_finish=True)
        recv[3].current_stream_wait()
        out = buffer.combine(expert_out, topk, weights, active, timeout_us, recv[2],
                             async_finish=True)  # fmt: skip
        out[1].current_stream_wait()

    def direct_hook() -> None:
        recv = buffer.dispatch(x, topk, active, T, E, timeout_us, use_fp8=True,
                               return_recv_hook=True)  # fmt: skip
        recv[4]()
        out = buffer.combine(expert_out, topk, weights, active, timeout_us, recv[2],
                             return_recv_hook=True)  # fmt: skip
        out[2]()

    def zero_copy() -> None:  # Mooncake's test_func(zero_copy=True), without the copy itself
        recv = buffer.dispatch(x, topk, active, T, E, timeout_us, use_fp8=True)
        buffer.get_next_combine_buffer(recv[2])
        buffer.combine(expert_out, topk, weights, active, timeout_us, recv[2], zero_copy=True)

    patterns = {
        "deepep-compat-sync": compat_sync,
        "buffer-sync": direct(active),
        "buffer-async": direct_async,
        "buffer-hook": direct_hook,
        "compat-logfmt": compat_logfmt,
        "buffer-zero-copy": zero_copy,
        "buffer-long-active": direct(long_active),
    }
    results: dict[str, Any] = {"label": args.label, "torch": torch.__version__}
    for default in ("none", "cuda"):
        if default == "cuda":
            torch.set_default_device("cuda")
        for name, pair in patterns.items():
            key = f"{name}/{default}"
            try:
                for _ in range(20):
                    pair()
                host = _host_us(pair, args.blocks, args.calls)
                avg, best = _e2e_us(pair, args.iters)
                results[key] = {"host_us": host, "e2e_avg_us": avg, "e2e_min_us": best}
                print(f"{args.label:>5} {key:<32} host {host:7.2f} us | e2e avg {avg:7.2f} us "
                      f"min {best:7.2f} us", flush=True)  # fmt: skip
            except Exception as exc:  # an older checkout may not support a pattern
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{args.label:>5} {key:<32} {type(exc).__name__}: {str(exc)[:100]}")
        torch.set_default_device(None)
    compat.destroy()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
