"""The bench's ``--mpi`` column: MPICH's shared-memory ``MPI_Allreduce`` (pip ``mpich`` +
``mpi4py``, run with ``mpiexec``), timed like the main run, as the floor small ops approach."""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Optional

from .bench import _pin, _should_pin, _time_ops, op_time


def _mpiexec() -> Optional[str]:
    import importlib.util
    import shutil

    if importlib.util.find_spec("mpi4py") is None:
        return None
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def run_mpi(args, sizes: list[int]) -> Optional[dict[int, float]]:
    """MPICH's MPI_Allreduce (float32, SUM) at ``sizes``, timed like the main run: size ->
    median seconds (slowest rank per op). None, with a note, when mpi4py/mpiexec are absent."""
    import subprocess

    exe = _mpiexec()
    if exe is None:
        print(
            "--mpi: mpi4py / mpiexec not installed (pip install mpich mpi4py); skipped",
            file=sys.stderr,
        )
        return None
    cfg = {
        "sizes": sizes, "warmup": args.warmup, "iters": args.iters, "reps": args.reps,
        "gap_s": args.gap_us / 1e6, "back_to_back": args.back_to_back, "pin": _should_pin(args),
    }  # fmt: skip
    cmd = [exe, "-n", str(args.world), sys.executable, "-m", "mooncake.pg.bench",
           "--mpi-worker", json.dumps(cfg)]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"--mpi: {' '.join(cmd[:3])} failed: {e}; skipped", file=sys.stderr)
        return None
    for line in out.stdout.splitlines():
        if line.startswith("MPIRESULT "):
            return {int(k): v for k, v in json.loads(line[10:]).items()}
    print(f"--mpi: no result from mpiexec; skipped ({out.stderr[-300:]})", file=sys.stderr)
    return None


def _mpi_worker(cfg: dict) -> None:
    import array

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if cfg["pin"]:
        _pin(rank)
    res = {}
    for size in cfg["sizes"]:
        n = max(world, max(1, size // 4) - max(1, size // 4) % world)
        src = array.array("f", bytes(4 * n))
        dst = array.array("f", bytes(4 * n))

        def op(src=src, dst=dst):
            comm.Allreduce([src, MPI.FLOAT], [dst, MPI.FLOAT], op=MPI.SUM)

        for _ in range(cfg["warmup"]):
            op()
        mine = []
        for _ in range(cfg["reps"] if cfg["back_to_back"] else cfg["iters"]):
            mine += _time_ops(op, comm.Barrier, cfg)
        allr = comm.gather(mine, root=0)
        if rank == 0:
            res[size] = statistics.median(op_time(col) for col in zip(*allr))
    if rank == 0:
        print("MPIRESULT " + json.dumps(res), flush=True)
