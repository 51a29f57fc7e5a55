"""Rank bodies for the shared-memory arena path (``backend/bulk.py``): large all_reduce and
broadcast checked against an exact reference and against gloo in the same processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from harness import init
from ops_cases import GLOO_REDUCE, REDUCE_OPS, data, reference

# Element counts above the arena thresholds (bulk.py) in every dtype used; odd counts give
# uneven chunks.
SIZES = {torch.float32: 300_001, torch.bfloat16: 200_003, torch.int64: 100_003}


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: {a.shape} vs {b.shape}"
    assert torch.equal(a, b), f"{what}: mismatch\n{a[:8]}\n{b[:8]}"


def arena_stats() -> dict:
    """How the arena path ran in this process: arenas, mapped peers, engine-read peers."""
    from mooncake.backend import bulk

    mapped = unmapped = 0
    for arena in list(bulk._arenas.values()):
        for maps in arena.remote.values():
            for _, buf in maps.values():
                if buf is None:
                    unmapped += 1
                else:
                    mapped += 1
    return {"arenas": len(bulk._arenas), "mapped": mapped, "unmapped": unmapped}


def bulk_vs_gloo_body(rank: int, world: int, port: int, rounds: int = 2) -> dict:
    init(rank, world, port)
    gloo = dist.new_group(backend="gloo")
    checks = 0
    for rnd in range(rounds):  # several rounds: arena halves and mappings are reused
        for dtype, n in SIZES.items():
            for opname in ("SUM", "AVG", "MAX"):
                op = REDUCE_OPS[opname]
                t = data(rank + rnd, n, dtype, opname)
                dist.all_reduce(t, op=op)
                if rnd == 0:
                    ref = reference(world, n, dtype, opname)
                else:  # inputs data(rnd) .. data(world + rnd - 1)
                    parts = [data(r + rnd, n, dtype, opname) for r in range(world)]
                    ref = _ref(parts, dtype, opname, world)
                _same(t, ref, f"all_reduce {opname} {dtype} n={n} round {rnd}")
                checks += 1
                if dtype in GLOO_REDUCE and opname != "AVG":
                    g = data(rank + rnd, n, dtype, opname)
                    dist.all_reduce(g, op=op, group=gloo)
                    _same(t, g, f"all_reduce vs gloo {opname} {dtype} n={n}")
                    checks += 1
            for root in range(world):
                mine = data(rank * 5 + rnd, n, dtype)
                t = mine.clone()
                dist.broadcast(t, src=root)
                _same(t, data(root * 5 + rnd, n, dtype), f"broadcast {dtype} root {root}")
                g = mine.clone()
                dist.broadcast(g, src=root, group=gloo)
                _same(t, g, f"broadcast vs gloo {dtype} root {root}")
                checks += 2
    # Coalesced (several arena regions in one op) and a size that makes the arena grow.
    ts = [torch.full((400_000,), float(rank + k)) for k in range(3)]
    dist.all_reduce_coalesced(ts)
    for k, t in enumerate(ts):
        assert torch.all(t == sum(r + k for r in range(world))), f"coalesced tensor {k}: {t[0]}"
    big = torch.full((3_000_000,), float(rank + 1))
    dist.all_reduce(big)
    assert torch.all(big == world * (world + 1) / 2), big[0]
    # A subgroup has its own arena.
    sub = dist.new_group(list(range(world))[::-1])
    t = torch.full((200_000,), rank, dtype=torch.int64)
    dist.all_reduce(t, group=sub)
    assert torch.all(t == world * (world - 1) // 2)
    checks += 5
    stats = arena_stats()
    stats["checks"] = checks
    return stats


def _ref(parts, dtype, opname, world):
    acc = parts[0].clone()
    for p in parts[1:]:
        acc = acc + p if opname in ("SUM", "AVG") else torch.maximum(acc, p)
    if opname == "AVG":
        acc = (
            acc / world if dtype.is_floating_point else torch.div(acc, world, rounding_mode="trunc")
        )
    return acc.to(dtype)


def large_loop_body(rank: int, world: int, port: int, iters: int) -> dict:
    """Large int64 all_reduce / broadcast in a loop (used with distinct host ids: the
    cross-host protocol with engine reads)."""
    init(rank, world, port)
    for i in range(iters):
        n = 150_001 + i
        t = torch.full((n,), 1 << rank, dtype=torch.int64)
        dist.all_reduce(t)
        assert torch.all(t == (1 << world) - 1), f"iter {i}: {t[0]}"
        root = i % world
        b = torch.full((n,), rank, dtype=torch.int64)
        dist.broadcast(b, src=root)
        assert torch.all(b == root), f"iter {i}: broadcast {b[0]}"
    return arena_stats()
