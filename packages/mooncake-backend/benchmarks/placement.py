"""Small all_reduce after blocking ops, with more ranks than cores: pinned against unpinned.

Each repetition runs ``--gloo`` all_reduces on a gloo group (ranks block in the kernel there and
the scheduler may re-place them), a barrier, then 50 timed 1 KiB all_reduces on ``mooncake-cpu``.
Prints the time per op of each repetition and the first ops of it. With ``--pin`` every rank is
pinned to one allowed CPU, round robin (what ``python -m mooncake.pg.bench --pin auto`` does).

    python packages/mooncake-backend/benchmarks/placement.py --world 4 --gloo 50
    python packages/mooncake-backend/benchmarks/placement.py --world 4 --gloo 50 --pin
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import mooncake.pg  # noqa: F401  (registers the backend)

    torch.set_num_threads(1)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("mooncake-cpu", rank=rank, world_size=world)
    gloo = dist.new_group(backend="gloo")
    t = torch.ones(256)
    for _ in range(200):
        dist.all_reduce(t)
    rows = []
    for _ in range(args.reps):
        for _ in range(args.gloo):
            dist.all_reduce(t, group=gloo)
        dist.barrier()
        start = time.perf_counter()
        stamps = []
        for _ in range(50):
            dist.all_reduce(t)
            stamps.append(time.perf_counter())
        per_op = (stamps[-1] - start) / 50 * 1e6
        first = [round((b - a) * 1e6) for a, b in zip([start, *stamps[:-1]], stamps)][:8]
        rows.append((per_op, first))
    if rank == 0:
        for per_op, first in rows:
            print(f"{per_op:6.0f} us/op   first ops (us): {first}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--gloo", type=int, default=50, help="gloo all_reduces before each repetition")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--pin", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"world {args.world}, {len(os.sched_getaffinity(0))} CPUs, pinned: {args.pin}")
    mp.spawn(_worker, args=(args.world, port, args), nprocs=args.world)


if __name__ == "__main__":
    main()
