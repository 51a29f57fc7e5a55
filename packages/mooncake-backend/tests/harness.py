"""Multi-process test harness: real processes, a real TCPStore, real SIGKILLs, hard timeouts."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """A standalone TCPStore served by the test process, so any rank (0 included) may die."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.port = free_port()
        self.server = dist.TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False)


def client_store(port: int, timeout_s: float = 60.0):
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))


def _child(fn: Callable, rank: int, world: int, port: int, q, args: tuple, env: dict) -> None:
    os.environ.update(env)
    sys.path.insert(0, HERE)
    import torch

    torch.set_num_threads(1)  # as torchrun does for several processes per machine
    try:
        res = fn(rank, world, port, *args)
        q.put((rank, "ok", res))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


class Ranks:
    """Start ``fn(rank, world, store_port, *args)`` in separate processes and collect results."""

    def __init__(self, timeout: float = 120.0, store: Optional[Store] = None) -> None:
        self.ctx = mp.get_context("spawn")
        self.q = self.ctx.Queue()
        self.store = store or Store()
        self.procs: dict[Any, mp.Process] = {}
        self.results: dict[Any, tuple[str, Any]] = {}
        self.deadline = time.monotonic() + timeout

    def start(
        self,
        fn: Callable,
        rank: int,
        world: int,
        *args,
        key: Any = None,
        env: Optional[dict] = None,
    ):
        p = self.ctx.Process(
            target=_child,
            args=(fn, rank, world, self.store.port, self.q, args, env or {}),
            daemon=True,
        )
        p.start()
        self.procs[rank if key is None else key] = p
        return p

    def kill(self, key: Any) -> None:
        os.kill(self.procs[key].pid, signal.SIGKILL)

    def collect(self, keys) -> dict:
        keys = set(keys)
        while keys - set(self.results):
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"ranks {sorted(map(str, keys - set(self.results)))} did not finish"
                )
            try:
                rank, status, res = self.q.get(timeout=min(left, 0.5))
            except queue.Empty:
                for k in keys - set(self.results):
                    p = self.procs[k]
                    if not p.is_alive() and p.exitcode not in (0, None):
                        # give the queue a moment: a result may be in flight
                        try:
                            rank, status, res = self.q.get(timeout=0.5)
                            self._record(rank, status, res)
                        except queue.Empty:
                            self.results[k] = ("died", p.exitcode)
                continue
            self._record(rank, status, res)
        return {k: self.results[k] for k in keys}

    def _record(self, rank, status, res) -> None:
        key = rank
        for k, p in self.procs.items():
            if k == rank or (
                isinstance(k, tuple) and k[0] == rank and k not in self.results and p.is_alive()
            ):
                key = k
        self.results[key] = (status, res)

    def close(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(timeout=5)

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_world(
    fn: Callable, world: int, *args, timeout: float = 120.0, env: Optional[dict] = None
) -> dict:
    """Run ``fn`` on ranks 0..world-1; raise with the first failure's traceback."""
    with Ranks(timeout=timeout) as r:
        for rank in range(world):
            r.start(fn, rank, world, *args, env=env)
        res = r.collect(range(world))
    bad = {k: v for k, v in res.items() if v[0] != "ok"}
    if bad:
        k, (status, detail) = sorted(bad.items(), key=lambda kv: str(kv[0]))[0]
        raise AssertionError(f"rank {k} {status}:\n{detail}")
    return {k: v[1] for k, v in res.items()}


def init(
    rank: int, world: int, port: int, backend: str = "mooncake-cpu", timeout_s: float = 60.0, **opts
):
    """init_process_group over the harness store; returns the active_ranks tensor."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from mooncake import pg

    size = opts.pop("max_world_size", None) or world
    active = torch.ones(size, dtype=torch.int32)
    dist.init_process_group(
        backend=backend,
        store=client_store(port),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        pg_options=pg.MooncakeBackendOptions(
            active, max_world_size=None if size == world else size, **opts
        ),
    )
    return active
