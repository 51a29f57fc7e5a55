"""``python -m mooncake.pg.bench``: collectives of the Mooncake backend against a reference
backend in the same processes (interleaved per op, A B B A), nccl-tests style, plus fault timing.

Examples::

    python -m mooncake.pg.bench --world 2 -c all_reduce -b 1K -e 64M
    python -m mooncake.pg.bench --world 4 -c all --backends mooncake-cpu,gloo --json out.json
    python -m mooncake.pg.bench --world 4 -c all_reduce --gap-us 20000 --mpi
    python -m mooncake.pg.bench --world 4 --fault kill --trials 20
    python -m mooncake.pg.bench --world 4 --fault stop --trials 3
    python -m mooncake.pg.bench --world 2 --device cuda --backends mooncake,nccl
    python -m mooncake.pg.bench --world 2 --device cuda --cuda-path direct,staged \
        -c all_reduce,all_gather --dtype bfloat16 -b 4K -e 256M -f 4

``--backends mooncake,nccl`` (with ``--device cuda``) adds NCCL where it can run: one GPU per
rank. Elsewhere (CPU tensors, fewer GPUs than ranks: NCCL refuses two ranks on one GPU) the
column is skipped and the reason printed.

``--cuda-path direct,staged`` (with ``--device cuda``) compares the ``"mooncake"`` backend's
CUDA paths in the same processes (one group per path, ``MooncakeBackendOptions(cuda_path=)``);
ratio = direct / staged. CUDA ops are timed to completion (``torch.cuda.synchronize()`` after
each op), and the device's own copy bandwidth (``copy_`` of 256 MiB) is printed next to them.

By default the bench measures what users get: torch's default intra-op threads in every rank
(what ``mp.spawn`` leaves; ``--threads N`` sets N for both backends alike) and each op timed
alone: a ``barrier()`` of the same backend before each op, then only the op is timed
(``--gap-us N``: the barrier, then N us of idle time, then the op). ``--back-to-back`` times
``-n`` ops in a row instead (the old mode; ``-r`` repetitions).

Columns: time per op (median over the timed ops; each op from the moment the last rank entered
it to the moment the last rank left it, on the host's shared monotonic clock; after ``-w``
warm-up ops), algbw = bytes / time, busbw = algbw x factor (all_reduce 2(n-1)/n;
all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast 1), and ratio = mooncake time /
reference time. ``--mpi`` adds MPICH's ``MPI_Allreduce`` (pip ``mpich`` + ``mpi4py``, run with
``mpiexec`` right after, same sizes and timing mode; all_reduce only) as a third column, and is
skipped with a note when those packages are absent.

``--pin auto`` (the default) pins rank ``r`` to the ``r``-th allowed CPU (round robin) when there
are more ranks than CPUs, for both backends alike: there, busy-polling ranks otherwise stay where
the scheduler first put them, and a 3+1 split of 4 ranks over 2 cores (seen after the reference
backend's blocking ops) makes every op wait for the crowded core (measured: world-4 all_reduce
1 KiB ~340 us pinned, 340-600 us unpinned depending on the split).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from typing import Optional

COLLECTIVES = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"]


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def human(n: int) -> str:
    for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def bus_factor(coll: str, n: int) -> float:
    if coll == "all_reduce":
        return 2 * (n - 1) / n
    if coll == "broadcast":
        return 1.0
    return (n - 1) / n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- workers
def _pin(rank: int) -> None:
    """Pin this process to one allowed CPU, chosen round robin by rank."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[rank % len(cpus)]})


def backend_spec(name: str) -> tuple[str, dict]:
    """``"mooncake:direct"`` -> ("mooncake", {"cuda_path": "direct"}) (``--cuda-path``)."""
    base, _, path = name.partition(":")
    return base, ({"cuda_path": path} if path else {})


def _init(rank: int, world: int, port: int, backend: str, **opts):
    import warnings

    import torch
    import torch.distributed as dist

    import mooncake.pg as pg

    # torch deprecates all_gather_into_tensor / reduce_scatter_tensor with a FutureWarning whose
    # per-call handling was measured at ~200 us in these loops (both backends pay it): not what
    # this bench measures.
    warnings.filterwarnings("ignore", category=FutureWarning)

    # Users' processes keep torch's default intra-op threads (mp.spawn does not change them);
    # ``--threads N`` sets them for every rank, for both backends alike.
    threads = opts.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    kw = {}
    backend, extra = backend_spec(backend)
    opts.update(extra)
    if backend.startswith("mooncake"):
        kw["pg_options"] = pg.MooncakeBackendOptions(
            torch.ones(opts.pop("cap", world), dtype=torch.int32, device="cpu"), **opts
        )
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
        **kw,
    )


def _op(coll: str, nbytes: int, world: int, group, device: str, dtype: str = "float32"):
    import torch

    op = _op_of(coll, nbytes, world, group, device, getattr(torch, dtype))
    if not device.startswith("cuda"):
        return op

    def timed():  # stream-ordered ops: time them to completion
        op()
        torch.cuda.synchronize()

    return timed


def _op_of(coll: str, nbytes: int, world: int, group, device: str, dtype):
    import torch as _t
    import torch.distributed as dist

    torch = _Torch(_t, dtype)  # ones / empty in ``dtype``
    # torch 2.13 renamed the tensor forms (the old names warn on every call, about 13 us here)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    n = max(1, nbytes // dtype.itemsize)
    n -= n % world
    n = max(n, world)
    if coll == "all_reduce":
        t = torch.ones(n, device=device)
        return lambda: dist.all_reduce(t, group=group)
    if coll == "all_gather":
        t = torch.ones(n // world, device=device)
        out = torch.empty(n, device=device)
        return lambda: all_gather(out, t, group=group)
    if coll == "reduce_scatter":
        t = torch.ones(n, device=device)
        out = torch.empty(n // world, device=device)
        return lambda: reduce_scatter(out, t, group=group)
    if coll == "all_to_all":
        t = torch.ones(n, device=device)
        out = torch.empty(n, device=device)
        return lambda: dist.all_to_all_single(out, t, group=group)
    if coll == "broadcast":
        t = torch.ones(n, device=device)
        return lambda: dist.broadcast(t, src=0, group=group)
    raise ValueError(f"unknown collective {coll!r}")


class _Torch:
    """``torch.ones`` / ``torch.empty`` with a fixed dtype (for ``_op_of``)."""

    def __init__(self, torch, dtype) -> None:
        self.t, self.dtype = torch, dtype

    def ones(self, n, device):
        return self.t.ones(n, device=device, dtype=self.dtype)

    def empty(self, n, device):
        return self.t.empty(n, device=device, dtype=self.dtype)


def _time_ops(op, barrier, args) -> list[tuple[float, float, int]]:
    """One timed sample per call: (start, end, ops) on the host's monotonic clock, which all
    ranks share. Per-op mode: barrier, optional idle gap, one op; back-to-back: ``iters`` ops."""
    barrier()
    if args["back_to_back"]:
        t0 = time.perf_counter()
        for _ in range(args["iters"]):
            op()
        return [(t0, time.perf_counter(), args["iters"])]
    if args["gap_s"]:
        time.sleep(args["gap_s"])
    t0 = time.perf_counter()
    op()
    return [(t0, time.perf_counter(), 1)]


def op_time(col) -> float:
    """Time per op of one sample over all ranks: from the moment the last rank entered to the
    moment the last rank left (ranks leave a barrier at different times; that skew is not the
    op's), divided by the ops in the sample."""
    return (max(e for _, e, _ in col) - max(s for s, _, _ in col)) / col[0][2]


def _perf_worker(rank, world, port, args, q):
    try:
        import torch.distributed as dist

        backends = args["backends"]
        if args["pin"]:
            _pin(rank)
        if args["device"].startswith("cuda"):
            import torch

            torch.cuda.set_device(rank % torch.cuda.device_count())
        _init(rank, world, port, backends[0], threads=args["threads"])
        groups = {backends[0]: None}
        for b in backends[1:]:
            base, extra = backend_spec(b)
            kw = {}
            if extra:
                import mooncake.pg as pg

                kw["pg_options"] = pg.MooncakeBackendOptions(**extra)
            groups[b] = dist.new_group(backend=base, **kw)
        rows = []
        rounds = args["reps"] if args["back_to_back"] else args["iters"]
        for coll in args["collectives"]:
            for size in args["sizes"]:
                ops = {
                    b: _op(coll, size, world, g, args["device"], args["dtype"])
                    for b, g in groups.items()
                }
                bars = {b: (lambda g=g: dist.barrier(group=g)) for b, g in groups.items()}
                for b in backends:
                    for _ in range(args["warmup"]):
                        ops[b]()
                samples = {b: [] for b in backends}
                for i in range(rounds):
                    # interleaved and position-balanced (A B B A ...): on a loaded host the op
                    # right after another backend's op is slower, so neither always goes second
                    for b in backends if i % 2 == 0 else backends[::-1]:
                        samples[b] += _time_ops(ops[b], bars[b], args)
                rows.append({"collective": coll, "bytes": size, "samples": samples})
                if rank == 0:
                    q.put(("progress", f"{coll} {human(size)} done"))
        dist.barrier()
        q.put(("rows", rank, rows))
        dist.destroy_process_group()
    except BaseException as e:
        import traceback

        q.put(("error", f"rank {rank}: {e}\n{traceback.format_exc()}"))


def merge_rows(per_rank: list[list[dict]]) -> list[dict]:
    """Rows with ``time_s`` per backend: the median over samples of ``op_time``."""
    out = []
    for rows in zip(*per_rank):
        first = rows[0]
        times = {}
        for b in first["samples"]:
            per_op = [op_time(col) for col in zip(*(r["samples"][b] for r in rows))]
            times[b] = statistics.median(per_op)
        out.append({"collective": first["collective"], "bytes": first["bytes"], "time_s": times})
    return out


def _should_pin(args) -> bool:
    if args.pin == "auto":
        return args.world > len(os.sched_getaffinity(0))
    return args.pin == "on"


def run_perf(args) -> list[dict]:
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841
    sizes = []
    s = args.begin
    while s <= args.end:
        sizes.append(s)
        s *= args.factor
    colls = COLLECTIVES if args.collective == "all" else args.collective.split(",")
    cfg = {
        "backends": args.backends.split(","),
        "collectives": colls,
        "sizes": sizes,
        "warmup": args.warmup,
        "iters": args.iters,
        "reps": args.reps,
        "device": args.device,
        "pin": _should_pin(args),
        "threads": args.threads,
        "gap_s": args.gap_us / 1e6,
        "back_to_back": args.back_to_back,
        "dtype": args.dtype,
    }
    procs = [
        ctx.Process(target=_perf_worker, args=(r, args.world, port, cfg, q), daemon=True)
        for r in range(args.world)
    ]
    for p in procs:
        p.start()
    per_rank: dict[int, list] = {}
    deadline = time.monotonic() + args.timeout
    while len(per_rank) < args.world:
        msg = q.get(timeout=max(1, deadline - time.monotonic()))
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        if msg[0] == "progress":
            print(f"  .. {msg[1]}", file=sys.stderr, flush=True)
        if msg[0] == "rows":
            per_rank[msg[1]] = msg[2]
    for p in procs:
        p.join(timeout=30)
    rows = merge_rows([per_rank[r] for r in range(args.world)])
    if args.mpi:
        from .bench_mpi import run_mpi

        mpi = run_mpi(args, sizes) if "all_reduce" in colls else None
        if mpi:
            for row in rows:
                if row["collective"] == "all_reduce" and row["bytes"] in mpi:
                    row["time_s"]["mpi"] = mpi[row["bytes"]]
    return rows


def nccl_unavailable(world: int, device: str) -> Optional[str]:
    """Why NCCL cannot run this world here (None: it can). NCCL needs CUDA tensors and one GPU
    per rank: several ranks on one GPU are refused by NCCL ("Duplicate GPU detected")."""
    import torch

    if not device.startswith("cuda"):
        return f"NCCL moves CUDA tensors only (--device {device})"
    if not torch.cuda.is_available():
        return "no CUDA device here"
    if not torch.distributed.is_nccl_available():
        return "this torch build has no NCCL"
    n = torch.cuda.device_count()
    if n < world:
        return (
            f"NCCL needs one GPU per rank: --world {world} but {n} GPU(s) visible (several ranks "
            "on one GPU is not a configuration NCCL runs)"
        )
    return None


def device_copy_bw(nbytes: int = 256 << 20, iters: int = 10) -> Optional[float]:
    """GB/s of a device-to-device ``copy_`` of ``nbytes`` (bytes copied / time)."""
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    return nbytes * iters / (time.perf_counter() - t0) / 1e9


def print_perf(rows, backends, world) -> None:
    ref = backends[1] if len(backends) > 1 else None
    if any("mpi" in r["time_s"] for r in rows):
        backends = [*backends, "mpi"]
    head = f"{'collective':<15}{'size':>8}" + "".join(
        f"{b + ' us':>18}{'algbw GB/s':>12}{'busbw GB/s':>12}" for b in backends
    )
    if ref:
        head += f"{'ratio':>8}"
    print(head)
    for row in rows:
        line = f"{row['collective']:<15}{human(row['bytes']):>8}"
        for b in backends:
            t = row["time_s"].get(b)
            if t is None:
                line += f"{'-':>18}{'-':>12}{'-':>12}"
                continue
            alg = row["bytes"] / t / 1e9
            line += (
                f"{t * 1e6:>18.1f}{alg:>12.3f}{alg * bus_factor(row['collective'], world):>12.3f}"
            )
        if ref:
            row["ratio"] = row["time_s"][backends[0]] / row["time_s"][ref]
            line += f"{row['ratio']:>8.3f}"
        print(line, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mooncake.pg.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-b", "--begin", type=parse_size, default=parse_size("1K"))
    ap.add_argument("-e", "--end", type=parse_size, default=parse_size("64M"))
    ap.add_argument("-f", "--factor", type=int, default=2)
    ap.add_argument(
        "-n",
        "--iters",
        type=int,
        default=None,
        help="timed ops per backend (default 20; with --back-to-back: ops per repetition, 50)",
    )
    ap.add_argument("-w", "--warmup", type=int, default=5)
    ap.add_argument(
        "-r",
        "--reps",
        type=int,
        default=3,
        help="with --back-to-back: interleaved repetitions per backend",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) in every rank, both backends alike (default: torch's own)",
    )
    ap.add_argument(
        "--gap-us",
        type=float,
        default=0.0,
        help="idle microseconds between the barrier and each timed op (per-op mode)",
    )
    ap.add_argument(
        "--back-to-back",
        action="store_true",
        help="time -n ops in a row per sample (the old mode) instead of each op alone",
    )
    ap.add_argument("--mpi", action="store_true", help="add MPICH MPI_Allreduce as a column")
    ap.add_argument("--mpi-worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "-c", "--collective", default="all_reduce", help=f"one of {COLLECTIVES}, comma list, or all"
    )
    ap.add_argument("--backends", default="mooncake-cpu,gloo")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="element type of the tensors (torch name)")
    ap.add_argument(
        "--cuda-path",
        default=None,
        help="with --device cuda: compare the mooncake backend's CUDA paths, e.g. direct,staged "
        "(replaces --backends; ratio = first / second)",
    )
    ap.add_argument(
        "--pin",
        choices=["auto", "on", "off"],
        default="auto",
        help="pin each rank to one CPU, round robin (auto: when there are more ranks than CPUs)",
    )
    ap.add_argument("--fault", choices=["kill", "stop"])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--victim", type=int, default=None)
    ap.add_argument("--heartbeat-timeout", type=float, default=1.0)
    ap.add_argument(
        "--settle", type=float, default=0.5, help="seconds of serving before the first fault"
    )
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    if args.mpi_worker:
        from .bench_mpi import _mpi_worker

        _mpi_worker(json.loads(args.mpi_worker))
        return 0
    if args.iters is None:
        args.iters = 50 if args.back_to_back else 20
    for name in ("iters", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.gap_us < 0:
        ap.error(f"--gap-us must be >= 0, got {args.gap_us}")
    if args.world < 2:
        ap.error(f"--world must be >= 2, got {args.world}")
    import torch

    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        ap.error(f"--dtype {args.dtype!r} is not a torch dtype")
    if args.cuda_path:
        from mooncake.backend.cuda_direct import MODES

        paths = [p.strip() for p in args.cuda_path.split(",") if p.strip()]
        bad = [p for p in paths if p not in MODES]
        if bad or not paths:
            ap.error(f"--cuda-path {args.cuda_path!r}: each entry must be one of {MODES}")
        if not args.device.startswith("cuda"):
            ap.error(f"--cuda-path needs --device cuda, got --device {args.device}")
        args.backends = ",".join(f"mooncake:{p}" for p in paths)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "nccl" in backends:
        why = nccl_unavailable(args.world, args.device)
        if why:
            print(f"# nccl column skipped: {why}", flush=True)
            backends.remove("nccl")
            if not backends:
                ap.error("--backends: nothing left to run without nccl")
        args.backends = ",".join(backends)
    if args.fault:
        args.victim = args.world // 2 if args.victim is None else args.victim
        if not 0 <= args.victim < args.world:
            ap.error(f"--victim {args.victim} out of range")
        if args.fault == "stop" and args.world < 3:
            ap.error(
                f"--fault stop needs --world >= 3, got {args.world}: a stopped peer is not proven "
                "dead, and one survivor of two is not a majority, so it raises EvictedError "
                "(the backend README's membership safety rule)"
            )
        from .bench_faults import run_fault

        res = run_fault(args)
        s = res["summary"]
        print(
            f"fault={args.fault} world={args.world} victim={args.victim} trials={args.trials}: "
            f"survivors' op after the fault median {s['survivor_latency_ms_median']:.1f} ms, "
            f"p99 {s['survivor_latency_ms_p99']:.1f} ms; replacement's first full-world op median "
            f"{s['join_first_op_ms_median']:.0f} ms, max {s['join_first_op_ms_max']:.0f} ms"
        )
        out = res
    else:
        rows = run_perf(args)
        print(
            f"# world={args.world} device={args.device} backends={args.backends} "
            f"iters={args.iters} warmup={args.warmup} reps={args.reps} "
            f"pinned={'yes' if _should_pin(args) else 'no'} "
            f"threads={args.threads or 'default'} "
            + ("back-to-back" if args.back_to_back else f"per-op gap_us={args.gap_us:g}")
        )
        copy_bw = device_copy_bw() if args.device.startswith("cuda") else None
        if copy_bw:
            print(f"# device copy bandwidth: {copy_bw:.1f} GB/s (copy_ of 256 MiB, bytes / time)")
        print_perf(rows, args.backends.split(","), args.world)
        out = {"world": args.world, "backends": args.backends.split(","), "rows": rows}
        if copy_bw:
            out["device_copy_GBps"] = copy_bw
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot and not args.fault:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot: matplotlib is not installed; skipped", file=sys.stderr)
        else:
            fig, ax = plt.subplots()
            for coll in sorted({r["collective"] for r in out["rows"]}):
                rs = [r for r in out["rows"] if r["collective"] == coll]
                for b in out["backends"]:
                    ax.loglog(
                        [r["bytes"] for r in rs],
                        [r["time_s"][b] * 1e6 for r in rs],
                        marker="o",
                        label=f"{coll} {b}",
                    )
            ax.set_xlabel("bytes")
            ax.set_ylabel("us per op")
            ax.legend(fontsize=6)
            fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
