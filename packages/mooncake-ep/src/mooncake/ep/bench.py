"""``python -m mooncake.ep.bench``: dispatch/combine time, bytes and logical bandwidth.

Spawns ``--ranks`` processes on this host (one process group over ``--backend``). Each iteration
times, on every rank, Mooncake EP's dispatch and combine and, interleaved in the same run (A B A B,
the order alternating), the gather-everything baseline (``reference.GatherEverythingEP``). An op's
time is the slowest rank's; the table shows medians over the iterations and the ratio ours/baseline.

Bytes per rank and op: ``wire`` = bytes handed to the backend for other ranks (ours: routed payload
plus metadata, from ``Buffer.stats``; baseline: its gathers), ``routed`` = the token bytes that must
move (ours' payload). Logical bandwidth as in docs/BENCHMARKS.md: dispatch bytes = selections x
(H + H/128*4 + 16) for FP8 (2H + 16 for BF16), combine bytes = selections x 2H, over the op's time.

``--device cuda`` runs the same loop on CUDA tensors with whatever path ``Buffer`` picks, timed
with CUDA events (kernel-level timing belongs to the fast path's own tools); no baseline there.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("mooncake.ep")

DEFAULTS = {"tokens": 128, "hidden": 7168, "topk": 8, "experts": 288}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_store() -> tuple[int, dist.TCPStore]:
    """A TCP store hosted by this process on a free local port, for ranks spawned here to join."""
    port = _free_port()
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world_size=None,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=120),
    )
    return port, store


def _default_backend(device: str) -> str:
    try:
        import mooncake.pg  # noqa: F401 - registers the backend

        return "mooncake-cpu" if device == "cpu" else "mooncake"
    except ImportError:
        return "gloo" if device == "cpu" else "nccl"


def _make_inputs(rank: int, args: argparse.Namespace, device: torch.device):
    gen = torch.Generator().manual_seed(1000 + rank)
    cpu = torch.device("cpu")
    x = (torch.randn((args.tokens, args.hidden), generator=gen, device=cpu) * 0.1).to(
        torch.bfloat16
    )
    scores = torch.randn((args.tokens, args.experts), generator=gen, device=cpu).abs() + 1
    topk_idx = torch.topk(scores, args.topk, dim=-1).indices
    weights = torch.randn((args.tokens, args.topk), generator=gen, device=cpu).abs()
    return x.to(device), topk_idx.to(device), weights.to(device)


class _Timer:
    """Wall time on CPU; CUDA events on CUDA (synchronised when read)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, begin: Any) -> float:
        """Seconds since ``begin``."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3
        return time.perf_counter() - begin


def _expert_outputs(recv_x: Any, recv_count: torch.Tensor, use_fp8: bool) -> torch.Tensor:
    """bf16 ``[L, R*T, H]`` with the valid rows filled (the received tokens, dequantized)."""
    from .fp8 import per_token_cast_back

    data = recv_x[0] if use_fp8 else recv_x
    out = torch.empty(data.shape, dtype=torch.bfloat16, device=data.device)
    for local, count in enumerate(recv_count.tolist()):
        if count:
            rows = (
                per_token_cast_back(data[local, :count], recv_x[1][local, :count])
                if use_fp8
                else data[local, :count]
            )
            out[local, :count] = rows
    return out


def _check_baseline(buffer: Any, baseline: Any, x, topk_idx, weights, active, args) -> bool:
    """The baseline must compute what we compute, or comparing times means nothing: same counts,
    layout and source indices, and combined outputs within the contract's BF16 tolerance."""
    from .fp8 import calc_diff

    use_fp8 = args.dispatch_dtype == "fp8"
    recv_x, recv_count, handle, _, _ = buffer.dispatch(
        x, topk_idx, active, args.tokens, args.experts, -1, use_fp8=use_fp8
    )
    ours = buffer.combine(
        _expert_outputs(recv_x, recv_count, use_fp8), topk_idx, weights, active, -1, handle
    )[0]
    b_recv_x, b_count, b_handle = baseline.dispatch(
        x, topk_idx, args.tokens, args.experts, use_fp8=use_fp8
    )
    theirs = baseline.combine(_expert_outputs(b_recv_x, b_count, use_fp8), weights, b_handle)
    return (
        torch.equal(recv_count.cpu(), b_count)
        and torch.equal(handle[0].cpu(), b_handle[0])
        and torch.equal(handle[1].cpu(), b_handle[1])
        and calc_diff(ours.cpu().float(), theirs.float()) < 1e-5
    )


def _rank_main(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    try:
        queue.put((rank, _run_rank(rank, args, port)))
    except BaseException as exc:
        import traceback

        queue.put((rank, {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}))
    queue.close()
    queue.join_thread()  # flush the result before skipping interpreter teardown
    sys.stdout.flush()
    os._exit(0)


def _run_rank(rank: int, args: argparse.Namespace, port: int) -> dict:
    from .buffer import Buffer
    from .reference import GatherEverythingEP

    torch.set_num_threads(args.threads)
    if args.backend.startswith("mooncake"):
        import mooncake.pg  # noqa: F401 - registers the backend
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group(
        args.backend, store=store, rank=rank, world_size=args.ranks, timeout=timedelta(seconds=300)
    )
    group = dist.group.WORLD
    num_ranks = args.ranks
    use_fp8 = args.dispatch_dtype == "fp8"
    hint = Buffer.get_ep_buffer_size_hint(args.tokens, args.hidden, num_ranks, args.experts)
    buffer = Buffer(group, hint if device.type == "cuda" else 0)
    baseline = GatherEverythingEP(group) if args.reference else None
    x, topk_idx, weights = _make_inputs(rank, args, device)
    active = torch.ones(num_ranks, dtype=torch.int32, device=device)
    timer = _Timer(device)
    selections = int((topk_idx >= 0).sum())
    times: dict[str, list[float]] = {
        "ours.dispatch": [],
        "ours.combine": [],
        "ref.dispatch": [],
        "ref.combine": [],
    }
    expert_out: Optional[torch.Tensor] = None
    ref_expert_out: Optional[torch.Tensor] = None
    wire = {"ours.dispatch": 0, "ours.combine": 0, "ref.dispatch": 0, "ref.combine": 0}
    routed = {"dispatch": 0, "combine": 0}

    def run_ours(record: bool) -> None:
        nonlocal expert_out
        stats0 = buffer.stats.snapshot() if buffer.stats is not None else None
        group.barrier()
        begin = timer.start()
        recv_x, recv_count, handle, _, _ = buffer.dispatch(
            x, topk_idx, active, args.tokens, args.experts, -1, use_fp8=use_fp8
        )
        elapsed = timer.stop(begin)
        if expert_out is None:
            expert_out = _expert_outputs(recv_x, recv_count, use_fp8)
        stats1 = buffer.stats.snapshot() if buffer.stats is not None else None
        group.barrier()
        begin = timer.start()
        buffer.combine(expert_out, topk_idx, weights, active, -1, handle)
        combine_elapsed = timer.stop(begin)
        if record:
            times["ours.dispatch"].append(elapsed)
            times["ours.combine"].append(combine_elapsed)
            if stats0 is not None:
                stats2 = buffer.stats.snapshot()
                wire["ours.dispatch"] = (
                    stats1["dispatch_payload_bytes"]
                    + stats1["dispatch_meta_bytes"]
                    - stats0["dispatch_payload_bytes"]
                    - stats0["dispatch_meta_bytes"]
                )
                wire["ours.combine"] = (
                    stats2["combine_payload_bytes"]
                    + stats2["combine_meta_bytes"]
                    - stats1["combine_payload_bytes"]
                    - stats1["combine_meta_bytes"]
                )
                routed["dispatch"] = (
                    stats1["dispatch_payload_bytes"] - stats0["dispatch_payload_bytes"]
                )
                routed["combine"] = (
                    stats2["combine_payload_bytes"] - stats1["combine_payload_bytes"]
                )

    def run_ref(record: bool) -> None:
        nonlocal ref_expert_out
        assert baseline is not None
        w0 = baseline.wire_bytes
        group.barrier()
        begin = timer.start()
        recv_x, recv_count, handle = baseline.dispatch(
            x, topk_idx, args.tokens, args.experts, use_fp8=use_fp8
        )
        elapsed = timer.stop(begin)
        w1 = baseline.wire_bytes
        if ref_expert_out is None:
            ref_expert_out = _expert_outputs(recv_x, recv_count, use_fp8)
        group.barrier()
        begin = timer.start()
        baseline.combine(ref_expert_out, weights, handle)
        combine_elapsed = timer.stop(begin)
        if record:
            times["ref.dispatch"].append(elapsed)
            times["ref.combine"].append(combine_elapsed)
            wire["ref.dispatch"] = w1 - w0
            wire["ref.combine"] = baseline.wire_bytes - w1

    baseline_matches = (
        _check_baseline(buffer, baseline, x, topk_idx, weights, active, args) if baseline else None
    )
    for it in range(args.warmup + args.iters):
        record = it >= args.warmup
        order = (run_ours, run_ref) if it % 2 == 0 else (run_ref, run_ours)
        for fn in order:
            if fn is run_ref and baseline is None:
                continue
            fn(record)
        if rank == 0 and args.progress and record:
            print(
                f"\r  iteration {it - args.warmup + 1}/{args.iters}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if rank == 0 and args.progress:
        print(file=sys.stderr)
    result = {
        "times": times,
        "wire": wire,
        "routed": routed,
        "selections": selections,
        "has_stats": buffer.stats is not None,
        "baseline_matches": baseline_matches,
        "path": buffer.path.name,
        "path_reason": buffer.path.reason,
    }
    buffer.destroy()
    group.barrier()
    return result


def _aggregate(per_rank: list[dict], args: argparse.Namespace) -> dict:
    hidden = args.hidden
    use_fp8 = args.dispatch_dtype == "fp8"
    per_sel_dispatch = hidden + hidden / 128 * 4 + 16 if use_fp8 else 2 * hidden + 16
    selections = statistics.mean(r["selections"] for r in per_rank)
    rows = []
    medians = {}
    for key in ("ours.dispatch", "ref.dispatch", "ours.combine", "ref.combine"):
        series = [r["times"][key] for r in per_rank]
        if not series[0]:
            continue
        slowest = [max(values) for values in zip(*series)]  # the op ends when its slowest rank does
        median = statistics.median(slowest)
        medians[key] = median
        op = key.split(".")[1]
        counted = key.startswith("ref") or per_rank[0]["has_stats"]  # fast path: no byte counters
        logical = selections * (per_sel_dispatch if op == "dispatch" else 2 * hidden)
        rows.append(
            {
                "impl": "mooncake-ep" if key.startswith("ours") else "gather-everything",
                "op": op,
                "median_ms": median * 1e3,
                "p10_ms": sorted(slowest)[len(slowest) // 10] * 1e3,
                "p90_ms": sorted(slowest)[(len(slowest) * 9) // 10] * 1e3,
                "wire_bytes_per_rank": statistics.mean(r["wire"][key] for r in per_rank)
                if counted
                else None,
                "routed_bytes_per_rank": statistics.mean(r["routed"][op] for r in per_rank)
                if counted and key.startswith("ours")
                else None,
                "logical_gbps": logical / median / 1e9,
            }
        )
    ratios = {}
    for op in ("dispatch", "combine"):
        if f"ref.{op}" in medians:
            ratios[op] = medians[f"ours.{op}"] / medians[f"ref.{op}"]
    if "ref.dispatch" in medians:
        ratios["total"] = (medians["ours.dispatch"] + medians["ours.combine"]) / (
            medians["ref.dispatch"] + medians["ref.combine"]
        )
    return {
        "config": {
            k: getattr(args, k)
            for k in (
                "ranks",
                "backend",
                "device",
                "tokens",
                "hidden",
                "topk",
                "experts",
                "dispatch_dtype",
                "iters",
                "warmup",
                "threads",
            )
        },
        "path": per_rank[0]["path"],
        "path_reason": per_rank[0]["path_reason"],
        "baseline_matches": None
        if per_rank[0]["baseline_matches"] is None
        else all(r["baseline_matches"] for r in per_rank),
        "selections_per_rank": selections,
        "rows": rows,
        "ratio_ours_over_reference": ratios,
    }


def _print_table(report: dict) -> None:
    cfg = report["config"]
    print(
        f"mooncake-ep bench: {cfg['ranks']} ranks, backend {cfg['backend']}, {cfg['device']}, "
        f"T={cfg['tokens']} H={cfg['hidden']} K={cfg['topk']} E={cfg['experts']}, "
        f"dispatch {cfg['dispatch_dtype']}, combine bf16, "
        f"{cfg['iters']} iterations (+{cfg['warmup']} warm-up), path {report['path']}"
    )
    columns = (
        ("op", "<9"),
        ("impl", "<19"),
        ("median ms", ">10"),
        ("p10 ms", ">9"),
        ("p90 ms", ">9"),
        ("wire MB/rank", ">14"),
        ("routed MB/rank", ">16"),
        ("logical GB/s", ">14"),
    )
    header = "".join(f"{name:{spec}}" for name, spec in columns)
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        routed = row["routed_bytes_per_rank"]
        values = (
            row["op"],
            row["impl"],
            f"{row['median_ms']:.2f}",
            f"{row['p10_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            "" if row["wire_bytes_per_rank"] is None else f"{row['wire_bytes_per_rank'] / 1e6:.3f}",
            "" if routed is None else f"{routed / 1e6:.3f}",
            f"{row['logical_gbps']:.3f}",
        )
        print("".join(f"{value:{spec}}" for value, (_, spec) in zip(values, columns)))
    if report["baseline_matches"] is not None:
        print(f"baseline computes the same results: {report['baseline_matches']}")
    for op, ratio in report["ratio_ours_over_reference"].items():
        print(f"ratio mooncake-ep / gather-everything ({op}): {ratio:.2f}x")


def _plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
        return
    rows = report["rows"]
    labels = [f"{r['op']}\n{r['impl']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(
        labels,
        [r["median_ms"] for r in rows],
        color=["tab:blue" if r["impl"] == "mooncake-ep" else "tab:gray" for r in rows],
    )
    ax.set_ylabel("median time per op (ms, slowest rank)")
    cfg = report["config"]
    ax.set_title(f"mooncake-ep {cfg['ranks']} ranks {cfg['backend']} H={cfg['hidden']}")
    fig.tight_layout()
    fig.savefig(path)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mooncake.ep.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument(
        "--backend",
        default=None,
        help="default: mooncake-cpu/mooncake if installed, else gloo/nccl",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--tokens", type=int, default=DEFAULTS["tokens"], help="tokens per rank (T = N)"
    )
    parser.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    parser.add_argument("--topk", type=int, default=DEFAULTS["topk"])
    parser.add_argument("--experts", type=int, default=DEFAULTS["experts"])
    parser.add_argument("--dispatch-dtype", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the gather-everything baseline",
    )
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument(
        "--plot", default=None, help="draw the medians into this PNG (needs matplotlib)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds before the run is abandoned"
    )
    parser.add_argument("--quiet", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.backend is None:
        args.backend = _default_backend(args.device)
    if args.device == "cuda":
        args.reference = False
    return args


def run(args: argparse.Namespace) -> dict:
    port, store = _host_store()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, args, port, queue), daemon=True)
        for rank in range(args.ranks)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + args.timeout
    try:
        while len(results) < args.ranks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"bench did not finish within {args.timeout} s")
            try:
                rank, value = queue.get(timeout=min(remaining, 5.0))
            except Exception:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    raise RuntimeError(f"ranks {dead} exited without a result") from None
                continue
            if "error" in value:
                raise RuntimeError(f"rank {rank} failed: {value['error']}")
            results[rank] = value
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                os.kill(proc.pid, 9)
        del store
    return _aggregate([results[r] for r in range(args.ranks)], args)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run(args)
    _print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        _plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
