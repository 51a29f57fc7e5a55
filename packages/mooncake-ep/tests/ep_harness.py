"""Multi-process harness: run one function on R ranks (spawned processes, real sockets).

``run_world(R, "module:function", args, backend=...)`` spawns R processes; each initialises a
process group over a TCP store hosted by this (the test) process, so killing any rank, rank 0
included, leaves the store alive for the others and for replacements. Each rank's return value (or
its traceback) comes back through a file. Every wait has a deadline; on timeout, the ranks still
running are killed (by pid) and the test fails with what each rank reported.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Backend of the non-fault tests: ours (mooncake-cpu) by default; MOONCAKE_EP_TEST_BACKEND=gloo (or
# any other torch.distributed backend) runs them on that one instead.
TEST_BACKEND = os.environ.get("MOONCAKE_EP_TEST_BACKEND", "mooncake-cpu")


@dataclass
class RankResult:
    rank: int
    exitcode: Optional[int]
    ok: bool
    value: Any = None
    error: str = ""
    slot: str = ""


@dataclass
class World:
    """Running processes, keyed by slot (``"0"``, ``"1"``, ... and e.g. ``"2-replacement"``)."""

    world_size: int
    procs: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    outdir: str = ""
    store: Any = None
    port: int = 0

    def results(self, timeout: float) -> list[RankResult]:
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        hung = [slot for slot, p in self.procs.items() if p.is_alive()]
        for slot in hung:
            os.kill(self.procs[slot].pid, 9)
            self.procs[slot].join(5)
        out = []
        for slot in sorted(self.procs, key=lambda k: (len(k), k)):
            path = os.path.join(self.outdir, f"rank{slot}.pkl")
            exitcode = self.procs[slot].exitcode
            rank = self.ranks[slot]
            if os.path.exists(path):
                with open(path, "rb") as f:
                    ok, payload = pickle.load(f)
                out.append(
                    RankResult(
                        rank, exitcode, ok, payload if ok else None, "" if ok else payload, slot
                    )
                )
            else:
                why = (
                    "hung (killed at the harness deadline)"
                    if slot in hung
                    else f"died with exit code {exitcode}"
                )
                out.append(RankResult(rank, exitcode, False, None, why, slot))
        return out


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    target: str,
    args: tuple,
    outdir: str,
    env: dict,
    slot: str,
) -> None:
    os.environ.update(env)
    sys.path.insert(0, TESTS_DIR)
    import torch

    torch.set_num_threads(1)
    result: tuple[bool, Any]
    try:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = (True, func(rank, world_size, port, backend, *args))
    except BaseException:
        result = (False, traceback.format_exc())
    name = f"rank{slot}.pkl"
    with open(os.path.join(outdir, name + ".tmp"), "wb") as f:
        pickle.dump(result, f)
    os.replace(os.path.join(outdir, name + ".tmp"), os.path.join(outdir, name))
    # Skip interpreter teardown: a process group with a dead peer may block in its destructor.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def start_world(
    world_size: int,
    target: str,
    args: tuple = (),
    backend: str = TEST_BACKEND,
    env: Optional[dict] = None,
) -> World:
    from mooncake.ep.bench import _host_store  # the benchmark spawns its ranks the same way

    port, store = _host_store()
    world = World(
        world_size, outdir=tempfile.mkdtemp(prefix="mooncake-ep-test-"), store=store, port=port
    )
    for rank in range(world_size):
        spawn_rank(world, rank, target, args, backend, env)
    return world


def spawn_rank(
    world: World,
    rank: int,
    target: str,
    args: tuple,
    backend: str,
    env: Optional[dict] = None,
    slot: Optional[str] = None,
) -> Any:
    """Start one rank's process under ``slot`` (default: the rank number)."""
    slot = str(rank) if slot is None else slot
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=_rank_main,
        args=(
            rank,
            world.world_size,
            world.port,
            backend,
            target,
            args,
            world.outdir,
            dict(env or {}),
            slot,
        ),
        daemon=True,
    )
    proc.start()
    world.procs[slot] = proc
    world.ranks[slot] = rank
    return proc


def run_world(
    world_size: int,
    target: str,
    args: tuple = (),
    backend: str = TEST_BACKEND,
    timeout: float = 120,
    env: Optional[dict] = None,
) -> list[RankResult]:
    return start_world(world_size, target, args, backend, env).results(timeout)


def assert_all_ok(results: list[RankResult]) -> list[Any]:
    failed = [r for r in results if not r.ok]
    if failed:
        text = "\n".join(f"--- rank {r.rank} (exit {r.exitcode}):\n{r.error}" for r in failed)
        raise AssertionError(f"{len(failed)} of {len(results)} ranks failed:\n{text}")
    return [r.value for r in results]


def run_matrix(
    world_size: int, env: dict, cases: list, extras: list, timeout: float, path: str
) -> list[Any]:
    """``test_cuda_fast_path.rank_matrix`` (the EP correctness matrix) on every rank of a gloo
    group under ``env``; asserts that no case differs from the portable path and that every rank
    ran on ``path``. Returns each rank's value."""
    values = assert_all_ok(
        run_world(
            world_size,
            "test_cuda_fast_path:rank_matrix",
            (cases, extras),
            backend="gloo",
            timeout=timeout,
            env=env,
        )
    )
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors[:40])
    assert all(v["path"] == path for v in values), [v["path"] for v in values]
    return values


def run_kill(world_size: int, env: dict, case: Any, point: str, occurrence: int) -> None:
    """``test_cuda_fast_path.rank_kill`` under ``env``: the last rank SIGKILLs itself at
    ``point`` (``occurrence``-th time); every survivor must end exact and have marked it."""
    results = run_world(
        world_size,
        "test_cuda_fast_path:rank_kill",
        (case, point, occurrence),
        backend="gloo",
        timeout=240,
        env=env,
    )
    victim = results[-1]
    assert victim.exitcode == -9, f"victim: exit {victim.exitcode}, {victim.error[:500]}"
    errors = []
    for r in results[:-1]:
        assert r.ok, f"rank {r.rank}: {r.error}"
        errors += r.value["errors"]
        assert r.value["marks"], f"rank {r.rank} never marked the killed rank"
    assert not errors, "\n".join(errors[:40])


def run_kernel_bench(env: dict, out: str) -> dict:
    """``python -m mooncake.ep._cuda.bench`` (one rank, DeepEP shape) under ``env``; its JSON."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "mooncake.ep._cuda.bench", "--iters", "20", "--json", out]
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def init_group(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float = 60,
    pg_options: Any = None,
) -> Any:
    """Initialise the default process group against the harness's store; returns the WORLD group."""
    import torch.distributed as dist

    if backend.startswith("mooncake"):
        import mooncake.pg  # noqa: F401 - registers the backend

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))
    kwargs = {} if pg_options is None else {"pg_options": pg_options}
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return dist.group.WORLD
