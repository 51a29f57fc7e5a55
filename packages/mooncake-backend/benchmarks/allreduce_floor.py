"""The memory-traffic floor of a same-host all-reduce on this machine, measured.

Two (or more) processes run only the memory traffic that a same-host all-reduce must do when every
rank keeps its input intact until the op is agreed (so a failed rank's op can re-run among the
survivors): no messages, no agreement, no Python per-op logic, just the copies and the reduction
through shared memory, separated by a barrier. Rank ``i`` owns chunk ``i`` of ``n`` bytes:

1. publish: copy the chunks of its input that the peers reduce into its shared arena;
2. reduce: its own chunk over every rank's contribution, into its arena;
3. gather: copy every reduced chunk into its output tensor.

It also measures the machine's memory bandwidth with every rank copying at once, and from it the
floor of *any* all-reduce that moves data between processes through shared memory. Per rank, of
``n`` bytes among ``w`` ranks: read its own chunk and the ``w-1`` contributions to it (n/w each),
write the reduced chunk twice (shared, so peers can read it, and into its own tensor), publish its
``w-1`` contributions to the peers' chunks (read and write), and copy the ``w-1`` reduced peer
chunks into its tensor (read and write): ``n * (3 + 5 (w - 1)) / w`` bytes, 4n at world 2.
Compare both with ``python -m mooncake.pg.bench -c all_reduce -b 64M -e 64M``.

    python packages/mooncake-backend/benchmarks/allreduce_floor.py --world 2 --mib 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.multiprocessing as mp


def _worker(rank, world, numel, iters, arenas, results, barrier):
    torch.set_num_threads(1)
    x = torch.rand(numel)
    out = torch.empty(numel)
    copies = []  # every rank copies n bytes at once: the machine's shared memory bandwidth
    for it in range(iters + 2):
        barrier.wait()
        t0 = time.perf_counter()
        out.copy_(x)
        barrier.wait()
        if it >= 2:
            copies.append(time.perf_counter() - t0)
    results[("copy", rank)] = statistics.median(copies)
    chunk = numel // world
    sl = [slice(i * chunk, (i + 1) * chunk) for i in range(world)]
    mine = arenas[rank]
    times = []
    for it in range(iters + 2):
        barrier.wait()
        t0 = time.perf_counter()
        for j in range(world):  # 1. publish the chunks the peers reduce
            if j != rank:
                mine[sl[j]].copy_(x[sl[j]])
        barrier.wait()
        acc = mine[sl[rank]]  # 2. reduce my chunk (own input read in place, never copied)
        parts = [x[sl[rank]] if r == rank else arenas[r][sl[rank]] for r in range(world)]
        torch.add(parts[0], parts[1], out=acc)
        for p in parts[2:]:
            acc.add_(p)
        barrier.wait()
        for j in range(world):  # 3. gather every reduced chunk into the output
            out[sl[j]].copy_(arenas[j][sl[j]])
        barrier.wait()
        if it >= 2:
            times.append(time.perf_counter() - t0)
    results[("phases", rank)] = statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    numel = a.mib * (1 << 20) // 4
    numel -= numel % a.world
    arenas = [torch.empty(numel).share_memory_() for _ in range(a.world)]
    ctx = mp.get_context("fork")
    results = ctx.Manager().dict()
    barrier = ctx.Barrier(a.world)
    procs = [
        ctx.Process(target=_worker, args=(r, a.world, numel, a.iters, arenas, results, barrier))
        for r in range(a.world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    n = numel * 4
    copy_s = max(results[("copy", r)] for r in range(a.world))
    bandwidth = a.world * 2 * n / copy_s  # bytes read + written per second, all ranks together
    per_rank = n * (3 + 5 * (a.world - 1)) / a.world
    floor = a.world * per_rank / bandwidth
    phases = max(results[("phases", r)] for r in range(a.world))
    print(
        f"world {a.world}, {a.mib} MiB float32 (medians of {a.iters}, slowest rank):\n"
        f"  memory bandwidth, every rank copying at once: {bandwidth / 1e9:.1f} GB/s "
        f"(one {a.mib} MiB copy per rank: {copy_s * 1e3:.1f} ms)\n"
        f"  least traffic per rank {per_rank / (1 << 20):.0f} MiB -> floor {floor * 1e3:.1f} ms\n"
        f"  the three phases run with barriers (no messages, no agreement): {phases * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
