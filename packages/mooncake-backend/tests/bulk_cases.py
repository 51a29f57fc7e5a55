"""Rank bodies for the shared-memory arena path (``backend/bulk.py``): large all_reduce,
broadcast and all_gather checked against an exact reference and against gloo in the same
processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from harness import init
from ops_cases import FLOATS, GLOO_REDUCE, INTS, MOVE_ONLY, REDUCE_OPS, data, reference

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
    predicted = sum(a.predicted for a in list(bulk._arenas.values()))
    return {
        "arenas": len(bulk._arenas),
        "mapped": mapped,
        "unmapped": unmapped,
        "predicted": predicted,
    }


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
    """Large int64 all_reduce / broadcast / all_gather in a loop (used with distinct host ids:
    the cross-host protocol with engine reads)."""
    init(rank, world, port)
    for i in range(iters):
        # Above and below the scratch pool's 1 MiB (engine reads land in pooled or fresh
        # buffers, which the commit must hold).
        n = 150_001 + i if i % 2 else 60_001 + i
        t = torch.full((n,), 1 << rank, dtype=torch.int64)
        dist.all_reduce(t)
        assert torch.all(t == (1 << world) - 1), f"iter {i}: {t[0]}"
        root = i % world
        b = torch.full((n,), rank, dtype=torch.int64)
        dist.broadcast(b, src=root)
        assert torch.all(b == root), f"iter {i}: broadcast {b[0]}"
        g = torch.full((n,), rank + i, dtype=torch.int64)
        outs = [torch.full((n,), -1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(outs, g)
        for r, o in enumerate(outs):
            assert torch.all(o == r + i), f"iter {i}: all_gather slot {r} holds {o[0]}"
    return arena_stats()


def allgather_body(rank: int, world: int, port: int) -> dict:
    """all_gather (list, into-tensor, in place) of every dtype at sizes around the arena
    threshold (``bulk.ALLGATHER_MIN_BYTES``: just below, at, just above, and large enough to
    grow the arena) against the exact inputs and against gloo; then the same among a reversed
    subgroup, interleaved with large broadcasts and all_reduces that share the arena."""
    from mooncake.backend import bulk

    init(rank, world, port)
    gloo = dist.new_group(backend="gloo")
    thr = bulk.ALLGATHER_MIN_BYTES
    assert thr > 0, "the arena all_gather is disabled (MOONCAKE_BULK_ALLGATHER_MIN=0)"
    checks = 0
    for dtype in FLOATS + INTS + MOVE_ONLY:
        es = dtype.itemsize
        for n in (thr // es - 1, thr // es, thr // es + 1, 3 * thr // es + 7, thr // es + 3):
            mine = data(rank + n, n, dtype)
            want = [data(r + n, n, dtype) for r in range(world)]
            outs = [torch.full((n,), 1, dtype=dtype) for _ in range(world)]
            dist.all_gather(outs, mine)
            for r in range(world):
                _same(outs[r], want[r], f"all_gather {dtype} n={n} slot {r}")
            assert torch.equal(mine, want[rank]), "all_gather modified its input"
            big = torch.empty(world * n, dtype=dtype)
            dist.all_gather_into_tensor(big, mine)
            _same(big, torch.cat(want), f"all_gather_into_tensor {dtype} n={n}")
            inplace = torch.zeros(world * n, dtype=dtype)
            inplace[rank * n : (rank + 1) * n] = mine
            dist.all_gather_into_tensor(inplace, inplace[rank * n : (rank + 1) * n])
            _same(inplace, torch.cat(want), f"in-place all_gather_into_tensor {dtype} n={n}")
            checks += 3
            if dtype in (torch.float32, torch.int64, torch.uint8, torch.float16):
                g = [torch.empty(n, dtype=dtype) for _ in range(world)]
                dist.all_gather(g, mine, group=gloo)
                for r in range(world):
                    _same(outs[r], g[r], f"all_gather vs gloo {dtype} n={n} slot {r}")
                checks += 1
    sub = dist.new_group(list(range(world))[::-1])  # torch sorts the ranks
    tail = dist.new_group(list(range(1, world)))  # group rank j = rank j + 1
    for i, n in enumerate((200_001, 50_000, 3_000_000, 200_001)):
        t = torch.full((n,), float(rank * 10 + i))
        outs = [torch.empty(n) for _ in range(world)]
        dist.all_gather(outs, t, group=sub)
        for j, o in enumerate(outs):
            assert torch.all(o == float(j * 10 + i)), f"subgroup slot {j}: {o[0]}"
        if rank and world > 2:
            outs = [torch.empty(n) for _ in range(world - 1)]
            dist.all_gather(outs, t, group=tail)
            for j, o in enumerate(outs):
                assert torch.all(o == float((j + 1) * 10 + i)), f"tail group slot {j}: {o[0]}"
        b = torch.full((n,), float(rank))
        dist.broadcast(b, src=i % world)
        assert torch.all(b == float(i % world)), f"broadcast {b[0]}"
        a = torch.full((n,), float(rank))
        dist.all_reduce(a)
        assert torch.all(a == world * (world - 1) / 2), f"all_reduce {a[0]}"
        checks += 3
    # Coalesced: several arena regions of one op.
    ins = [torch.full((100_000 + k,), float(rank + k)) for k in range(3)]
    outs = [[torch.empty(100_000 + k) for _ in range(world)] for k in range(3)]
    dist.all_gather_coalesced(outs, ins)
    for k in range(3):
        for r in range(world):
            assert torch.all(outs[k][r] == float(r + k)), f"coalesced {k} slot {r}"
    checks += 1
    stats = arena_stats()
    stats["checks"] = checks
    return stats


def multi_tensor_broadcast_body(rank: int, world: int, port: int) -> int:
    """One broadcast op of several tensors (the backend's ``broadcast`` with a list, as
    coalesced callers issue it): small (fused round) and arena-sized ones, every root. Each
    tensor's message round must not run the agreement on its own (only the op's last may)."""
    init(rank, world, port)
    be = dist.group.WORLD._get_backend(torch.device("cpu"))
    checks = 0
    for it in range(2 * world):
        root = it % world
        sizes = [(1000, 200_000, 7), (200_000, 300_000), (1000, 2000)][it % 3]
        ts = [torch.full((n,), float(rank * 100 + k)) for k, n in enumerate(sizes)]
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        be.broadcast(ts, opts).wait()
        for k, t in enumerate(ts):
            assert torch.all(t == float(root * 100 + k)), f"iter {it} tensor {k}: {t[0]}"
            checks += 1
    return checks
