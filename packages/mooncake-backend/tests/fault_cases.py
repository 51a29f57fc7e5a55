"""Rank bodies for fault tests: loops of collectives whose results identify the contributors."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from harness import init


def mask_of(active: torch.Tensor) -> int:
    return sum(1 << r for r, a in enumerate(active.tolist()) if a)


def allreduce_loop(
    rank: int,
    world: int,
    port: int,
    iters: int,
    sizes: tuple,
    ops: tuple,
    pace: float = 0.0,
    ready_path: str = "",
):
    """Each op's result must be the bitmask of the contributors = active_ranks after the op."""
    active = init(rank, world, port, timeout_s=30.0)
    if ready_path:
        dist.barrier()
        open(f"{ready_path}.{rank}", "w").close()
    log = []
    for i in range(iters):
        n = sizes[i % len(sizes)]
        kind = ops[i % len(ops)]
        t0 = time.monotonic()
        if kind == "all_reduce":
            t = torch.full((n,), 1 << rank, dtype=torch.int64)
            dist.all_reduce(t)
            got = int(t[0])
            assert torch.all(t == got), "all_reduce result not uniform"
        elif kind == "all_gather":
            t = torch.full((n,), 1 << rank, dtype=torch.int64)
            outs = [torch.full((n,), -1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(outs, t)
            got = 0
            for r, o in enumerate(outs):
                v = int(o[0])
                assert torch.all(o == v), "all_gather slot not uniform"
                assert v in (0, 1 << r), f"slot {r} holds {v}: stale or foreign data"
                got |= v
        elif kind == "all_gather_single":
            t = torch.full((n,), 1 << rank, dtype=torch.int64)
            out = torch.full((world, n), -1, dtype=torch.int64)
            getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, t)
            got = 0
            for r in range(world):
                v = int(out[r, 0])
                assert torch.all(out[r] == v), "all_gather_single row not uniform"
                assert v in (0, 1 << r), f"row {r} holds {v}: stale or foreign data"
                got |= v
        elif kind == "reduce_scatter_single":
            t = torch.full((world * n,), 1 << rank, dtype=torch.int64)
            out = torch.full((n,), -1, dtype=torch.int64)
            getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, t)
            got = int(out[0])
            assert torch.all(out == got), "reduce_scatter result not uniform"
            assert torch.all(t == 1 << rank), "reduce_scatter changed its input"
        elif kind in ("reduce", "gather", "scatter"):
            # Rooted ops: the root checks its own result against the contributors (active_ranks
            # after the op); every survivor records None, so all logs stay identical.
            root = i % world
            t = torch.full((n,), 1 << rank, dtype=torch.int64)
            if kind == "reduce":
                dist.reduce(t, dst=root)
                if rank == root:
                    assert torch.all(t == mask_of(active)), f"reduce gave {int(t[0]):b}"
            elif kind == "gather":
                outs = [torch.full((n,), -1, dtype=torch.int64) for _ in range(world)]
                dist.gather(t, outs if rank == root else None, dst=root)
                if rank == root:
                    got = 0
                    for r, o in enumerate(outs):
                        assert torch.all(o == int(o[0])), "gather slot not uniform"
                        assert int(o[0]) in (0, 1 << r), f"gather slot {r} holds {int(o[0])}"
                        got |= int(o[0])
                    assert got == mask_of(active), f"gather gave {got:b}"
            else:
                ins = [torch.full((n,), 100 * root + r, dtype=torch.int64) for r in range(world)]
                out = torch.full((n,), -1, dtype=torch.int64)
                dist.scatter(out, ins if rank == root else None, src=root)
                want = 100 * root + rank if active[root] else -1  # a failed root: unchanged
                assert torch.all(out == want), f"scatter gave {int(out[0])}, want {want}"
            got = None
        elif kind == "broadcast":
            root = i % world
            t = torch.full((n,), 1 << rank, dtype=torch.int64)
            dist.broadcast(t, src=root)
            got = int(t[0])
            assert torch.all(t == got)
            if not active[root]:
                assert got == 1 << rank, "broadcast from a failed root changed the tensor"
                got = None  # unchanged on every survivor (each keeps its own input)
        elif kind == "barrier":
            dist.barrier()
            got = None
        dt = time.monotonic() - t0
        log.append((i, kind, got, mask_of(active), dt))
        if pace:
            time.sleep(pace)
    return log


def allreduce_loop_lane(rank: int, world: int, port: int, *args):
    """``allreduce_loop``, plus how many ops the small all_reduce lane (``small_ops``) finished
    alone and how many it handed to the protocol."""
    log = allreduce_loop(rank, world, port, *args)
    lane = dist.group.WORLD._get_backend(torch.device("cpu"))._small
    return log, (lane.clean, lane.resumed)
