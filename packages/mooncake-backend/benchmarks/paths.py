"""Broadcast / all_gather data paths against each other in the same processes (for the size
thresholds in ``backend/bulk.py`` and ``backend/collectives.py``).

Every rank switches the path of each op by setting the module thresholds (all ranks alike, at
the same op), so the variants see the same machine state: per op, each variant once in an order
drawn from a seed all ranks share (position-balanced: on a loaded host the op right after a gloo
op is slower), each after a barrier of its own backend, as ``python -m mooncake.pg.bench`` times
ops. Time of an op = last rank out - last rank in (the host's monotonic clock). Prints, per size
and variant, the range of the per-repetition medians, their median and the ratio to gloo.

Variants: broadcast ``bulk`` (arena path from 1 byte), ``fused`` (the one-round small path up
to 512 KiB - 1), ``default`` (the shipped thresholds), ``gloo``; all_gather ``arena``, ``inline``,
``default``, ``gloo``.

    python packages/mooncake-backend/benchmarks/paths.py --world 4 -c broadcast \\
        --sizes 16K,32K,64K,256K
    python packages/mooncake-backend/benchmarks/paths.py --world 2 -c all_gather \\
        --sizes 4K,16K,64K,256K,1M
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VARIANTS = {
    "broadcast": ["bulk", "fused", "default", "gloo"],
    "all_gather": ["arena", "inline", "default", "gloo"],
}


def _size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, q) -> None:
    import mooncake.pg  # noqa: F401  (registers the backend)
    from mooncake.backend import bulk, collectives

    cpus = sorted(os.sched_getaffinity(0))
    if world > len(cpus):  # as the bench's --pin auto
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    gloo = dist.new_group(backend="gloo")
    shipped = (
        collectives.SMALL_BROADCAST_BYTES,
        bulk.BROADCAST_MIN_BYTES,
        bulk.ALLGATHER_MIN_BYTES,
    )

    def use(v: str) -> None:
        small, bmin, gmin = shipped
        if v == "bulk":
            bmin = 1
        elif v == "fused":
            small, bmin = 512 * 1024 - 1, 1 << 60
        elif v == "arena":
            gmin = 1
        elif v == "inline":
            gmin = 0
        collectives.SMALL_BROADCAST_BYTES = small
        bulk.BROADCAST_MIN_BYTES, bulk.ALLGATHER_MIN_BYTES = bmin, gmin

    variants = args.variants.split(",") if args.variants else VARIANTS[args.collective]
    stamps: dict = {}
    for nbytes in [_size(s) for s in args.sizes.split(",")]:
        n = max(1, nbytes // 4)
        t = torch.full((n,), float(rank))
        outs = [torch.empty(n) for _ in range(world)]
        for rep in range(args.reps):
            rng = random.Random(1000 * rep + nbytes)  # the same draws on every rank
            for i in range(args.warmup + args.iters):
                for v in rng.sample(variants, len(variants)):
                    use(v)
                    g = gloo if v == "gloo" else None
                    dist.barrier(group=g)
                    t0 = time.monotonic()
                    if args.collective == "broadcast":
                        dist.broadcast(t, src=i % world, group=g)
                    else:
                        dist.all_gather(outs, t, group=g)
                    t1 = time.monotonic()
                    if i >= args.warmup:
                        stamps.setdefault((nbytes, v, rep), []).append((t0, t1))
    use("default")
    every = [None] * world
    dist.all_gather_object(every, stamps, group=gloo)
    if rank == 0:
        out = {}
        for key in stamps:
            per = [every[r][key] for r in range(world)]
            times = [
                max(p[i][1] for p in per) - max(p[i][0] for p in per) for i in range(len(per[0]))
            ]
            out[key] = statistics.median(times) * 1e6
        q.put(out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("-c", "--collective", choices=sorted(VARIANTS), default="broadcast")
    ap.add_argument("--sizes", default="16K,64K,256K,1M")
    ap.add_argument("--variants", default="", help="comma list (default: all of the collective)")
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("-n", "--iters", type=int, default=20)
    ap.add_argument("-w", "--warmup", type=int, default=3)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, args.world, port, args, q)) for r in range(args.world)
    ]
    for p in procs:
        p.start()
    out = q.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    print(
        f"world {args.world} {args.collective}, per-op, {args.reps} reps x {args.iters} ops: "
        "range of the rep medians (us) | median | ratio to gloo"
    )
    names = sorted({k[1] for k in out})
    for nbytes in sorted({k[0] for k in out}):
        ref = None
        if "gloo" in names:
            ref = statistics.median(out[(nbytes, "gloo", r)] for r in range(args.reps))
        for v in names:
            xs = [out[(nbytes, v, r)] for r in range(args.reps)]
            m = statistics.median(xs)
            line = f"{nbytes >> 10:6d}K {v:8s} {min(xs):7.0f}-{max(xs):<7.0f} {m:7.0f}"
            print(line + (f"  {m / ref:5.2f}x" if ref else ""))


if __name__ == "__main__":
    main()
