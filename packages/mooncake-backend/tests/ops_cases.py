"""Rank bodies: every op, reduce op and dtype on "mooncake-cpu", checked against gloo (same run)
where gloo supports the dtype and against an exact local reference everywhere."""

from __future__ import annotations

import torch
import torch.distributed as dist
from harness import init

REDUCE_OPS = {
    "SUM": dist.ReduceOp.SUM,
    "AVG": dist.ReduceOp.AVG,
    "PRODUCT": dist.ReduceOp.PRODUCT,
    "MIN": dist.ReduceOp.MIN,
    "MAX": dist.ReduceOp.MAX,
    "BAND": dist.ReduceOp.BAND,
    "BOR": dist.ReduceOp.BOR,
    "BXOR": dist.ReduceOp.BXOR,
}
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
MOVE_ONLY = [torch.bool, torch.complex64, torch.float8_e4m3fn]
GLOO_REDUCE = {
    torch.float32,
    torch.float64,
    torch.float16,
    torch.int32,
    torch.int64,
    torch.int8,
    torch.uint8,
}


def data(rank: int, n: int, dtype: torch.dtype, op: str = "SUM") -> torch.Tensor:
    """Deterministic per-rank input whose reductions are exact in every dtype."""
    idx = torch.arange(n, dtype=torch.int64)
    if op == "PRODUCT":
        base = (idx + rank) % 2 + 1  # 1 or 2: products stay small
    else:
        base = (idx * 7 + rank * 3) % 11
    if dtype == torch.bool:
        return (base % 2).bool()
    if dtype.is_complex:
        return torch.complex(base.float(), (base + 1).float()).to(dtype)
    if dtype in (torch.float8_e4m3fn,):
        return base.float().to(dtype)
    return base.to(dtype)


def reference(world: int, n: int, dtype: torch.dtype, op: str) -> torch.Tensor:
    parts = [data(r, n, dtype, op) for r in range(world)]
    acc = parts[0].clone()
    for p in parts[1:]:
        if op in ("SUM", "AVG"):
            acc = acc + p
        elif op == "PRODUCT":
            acc = acc * p
        elif op == "MIN":
            acc = torch.minimum(acc, p)
        elif op == "MAX":
            acc = torch.maximum(acc, p)
        elif op == "BAND":
            acc = acc & p
        elif op == "BOR":
            acc = acc | p
        elif op == "BXOR":
            acc = acc ^ p
    if op == "AVG":
        acc = (
            acc / world if dtype.is_floating_point else torch.div(acc, world, rounding_mode="trunc")
        )
    return acc.to(dtype)


def ops_body(rank: int, world: int, port: int, sizes=(1, 7, 1000, 40000)) -> int:
    init(rank, world, port)
    gloo = dist.new_group(backend="gloo")
    checks = 0

    def same(a, b, what):
        nonlocal checks
        mismatch = f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert a.dtype == b.dtype, mismatch
        assert a.shape == b.shape, mismatch
        if a.dtype.is_floating_point and a.dtype.itemsize == 1:
            a, b = a.float(), b.float()
        assert torch.equal(a, b), f"{what}: mismatch\n{a[:8]}\n{b[:8]}"
        checks += 1

    # all_reduce: every reduce op x dtype
    for n in sizes:
        for opname, op in REDUCE_OPS.items():
            for dtype in FLOATS + INTS + [torch.bool]:
                if opname in ("BAND", "BOR", "BXOR") and dtype.is_floating_point:
                    continue
                if dtype == torch.bool and opname in ("AVG",):
                    continue
                if (
                    opname == "PRODUCT"
                    and dtype in (torch.float16, torch.bfloat16, torch.int8, torch.uint8)
                    and world > 4
                ):
                    continue  # 2**8 overflows
                t = data(rank, n, dtype, opname)
                dist.all_reduce(t, op=op)
                if dtype != torch.bool:
                    same(
                        t, reference(world, n, dtype, opname), f"all_reduce {opname} {dtype} n={n}"
                    )
                if dtype in GLOO_REDUCE and opname not in ("AVG", "BAND", "BOR", "BXOR"):
                    g = data(rank, n, dtype, opname)
                    dist.all_reduce(g, op=op, group=gloo)
                    same(t, g, f"all_reduce vs gloo {opname} {dtype} n={n}")
    # data movement: every dtype
    for n in sizes:
        for dtype in FLOATS + INTS + MOVE_ONLY:
            mine = data(rank, n, dtype)
            # broadcast from every root
            for root in range(world):
                t = mine.clone()
                dist.broadcast(t, src=root)
                same(t, data(root, n, dtype), f"broadcast root={root} {dtype}")
            # all_gather (list) and all_gather_into_tensor
            outs = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(outs, mine)
            for r in range(world):
                same(outs[r], data(r, n, dtype), f"all_gather {dtype}")
            big = torch.empty(world * n, dtype=dtype)
            dist.all_gather_into_tensor(big, mine)
            same(
                big,
                torch.cat([data(r, n, dtype) for r in range(world)]),
                f"all_gather_into_tensor {dtype}",
            )
            # gather / scatter to/from root world-1
            root = world - 1
            g_outs = [torch.empty_like(mine) for _ in range(world)] if rank == root else None
            dist.gather(mine, g_outs, dst=root)
            if rank == root:
                for r in range(world):
                    same(g_outs[r], data(r, n, dtype), f"gather {dtype}")
            s_out = torch.empty_like(mine)
            s_in = [data(r + 100, n, dtype) for r in range(world)] if rank == 0 else None
            dist.scatter(s_out, s_in, src=0)
            same(s_out, data(rank + 100, n, dtype), f"scatter {dtype}")
            # all_to_all (list) and all_to_all_single with uneven splits
            ins = [data(rank * world + d, n, dtype) for d in range(world)]
            outs = [torch.empty_like(mine) for _ in range(world)]
            dist.all_to_all(outs, ins)
            for s in range(world):
                same(outs[s], data(s * world + rank, n, dtype), f"all_to_all {dtype}")
            in_splits = [(rank + d) % 3 + 1 for d in range(world)]
            out_splits = [(s + rank) % 3 + 1 for s in range(world)]
            inp = torch.cat([data(rank * 10 + d, in_splits[d], dtype) for d in range(world)])
            out = torch.empty(sum(out_splits), dtype=dtype)
            dist.all_to_all_single(out, inp, out_splits, in_splits)
            same(
                out,
                torch.cat([data(s * 10 + rank, out_splits[s], dtype) for s in range(world)]),
                f"all_to_all_single {dtype}",
            )
    # reduce, reduce_scatter (list and tensor) for reducible dtypes, vs gloo too
    for n in sizes:
        for dtype in FLOATS + INTS:
            for opname in ("SUM", "MAX", "MIN"):
                op = REDUCE_OPS[opname]
                t = data(rank, n, dtype)
                dist.reduce(t, dst=1 % world, op=op)
                if rank == 1 % world:
                    same(t, reference(world, n, dtype, opname), f"reduce {opname} {dtype}")
                ins = [data(rank + 10 * d, n, dtype) for d in range(world)]
                out = torch.empty(n, dtype=dtype)
                dist.reduce_scatter(out, ins, op=op)
                exp = reference(world, n, dtype, opname) if False else None
                parts = [data(r + 10 * rank, n, dtype) for r in range(world)]
                exp = parts[0].clone()
                for p in parts[1:]:
                    exp = (
                        exp + p
                        if opname == "SUM"
                        else (torch.maximum(exp, p) if opname == "MAX" else torch.minimum(exp, p))
                    )
                same(out, exp, f"reduce_scatter {opname} {dtype}")
                out2 = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(out2, torch.cat(ins), op=op)
                same(out2, exp, f"reduce_scatter_tensor {opname} {dtype}")
    # async ops, futures, barrier, coalesced, p2p
    t = data(rank, 100, torch.float32)
    w = dist.all_reduce(t, async_op=True)
    w.wait()
    assert w.is_completed(), "is_completed() is False after wait()"
    assert torch.equal(w.result()[0], t), "Work.result() is not the reduced tensor"
    fut = w.get_future()
    fut.wait()
    same(t, reference(world, 100, torch.float32, "SUM"), "async all_reduce")
    dist.barrier()
    ts = [data(rank, 10, torch.int64), data(rank, 20, torch.int64)]
    dist.all_reduce_coalesced(ts)
    same(ts[0], reference(world, 10, torch.int64, "SUM"), "coalesced 0")
    same(ts[1], reference(world, 20, torch.int64, "SUM"), "coalesced 1")
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for n in (5, 100000):
        send = data(rank, n, torch.float32)
        recv = torch.empty(n)
        reqs = dist.batch_isend_irecv(
            [dist.P2POp(dist.irecv, recv, prv), dist.P2POp(dist.isend, send, nxt)]
        )
        for r in reqs:
            r.wait()
        same(recv, data(prv, n, torch.float32), f"batch_isend_irecv n={n}")
        if rank % 2 == 0:
            dist.send(send, dst=nxt, tag=7)
            dist.recv(recv, src=prv, tag=7)
        else:
            dist.recv(recv, src=prv, tag=7)
            dist.send(send, dst=nxt, tag=7)
        same(recv, data(prv, n, torch.float32), f"send/recv n={n}")
    # Work.wait(timeout): completes in time; an unanswered irecv raises TimeoutError
    from datetime import timedelta

    w = dist.all_reduce(data(rank, 10, torch.float32), async_op=True)
    assert w.wait(timeout=timedelta(seconds=5))
    assert w.is_completed()
    lonely = dist.irecv(torch.empty(3), src=prv, tag=12345)
    try:
        lonely.wait(timeout=timedelta(seconds=0.2))
        raise AssertionError("irecv with nobody sending did not time out")
    except TimeoutError:
        pass
    # functional collectives
    import torch.distributed._functional_collectives as fc

    t = data(rank, 64, torch.float32)
    r = fc.all_reduce(t, "sum", dist.group.WORLD)
    same(
        r.wait() if hasattr(r, "wait") else r,
        reference(world, 64, torch.float32, "SUM"),
        "functional all_reduce",
    )
    # subgroups: any member order, nested
    if world >= 3:
        members = [world - 1, 0, 1]
        sub = dist.new_group(members)
        if rank in members:
            t = data(rank, 10, torch.int64)
            dist.all_reduce(t, group=sub)
            exp = sum(data(r, 10, torch.int64) for r in members)
            same(t, exp, "subgroup all_reduce")
            sub2 = dist.new_group([0, 1]) if True else None
        else:
            sub2 = dist.new_group([0, 1])
        if rank in (0, 1):
            t = data(rank, 10, torch.int64)
            dist.all_reduce(t, group=sub2)
            same(
                t, data(0, 10, torch.int64) + data(1, 10, torch.int64), "nested subgroup all_reduce"
            )
    assert dist.get_world_size() == world
    from mooncake import pg

    assert pg.get_active_ranks().tolist() == [1] * world
    dist.destroy_process_group()
    return checks


def ddp_body(rank, world, port):
    import torch
    import torch.distributed as dist
    from harness import init

    init(rank, world, port)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 8) * (rank + 1)
        loss = ddp(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    outs = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(outs, flat)
    assert all(torch.equal(o, flat) for o in outs), "replicas diverged"
    return float(flat.sum())


def empty_splits_body(rank, world, port):
    import torch
    import torch.distributed as dist
    from harness import init

    init(rank, world, port)
    W = 5
    # rank 2 sends nothing; rank 1 receives nothing
    in_splits = [0 if (rank == 2 or d == 1) else 1 for d in range(world)]
    out_splits = [0 if (s == 2 or rank == 1) else 1 for s in range(world)]
    inp = torch.full((sum(in_splits), W), rank, dtype=torch.uint8)
    out = torch.full((sum(out_splits), W), 99, dtype=torch.uint8)
    dist.all_to_all_single(out, inp, out_splits, in_splits)
    exp = torch.cat([torch.full((out_splits[s], W), s, dtype=torch.uint8) for s in range(world)])
    assert torch.equal(out, exp), (out, exp)
    return out.shape[0]


def coalesced_large_body(rank: int, world: int, port: int):
    """Several large tensors in one coalesced all_reduce must not share scratch buffers."""
    init(rank, world, port)
    ts = [torch.full((300000,), float((rank + 1) * (k + 1))) for k in range(3)]
    for _ in range(2):
        for k, t in enumerate(ts):
            t.fill_(float((rank + 1) * (k + 1)))
        dist.all_reduce_coalesced(ts)
        tot = world * (world + 1) / 2
        for k, t in enumerate(ts):
            assert torch.all(t == tot * (k + 1)), f"tensor {k}: {t[0]} != {tot * (k + 1)}"
    return True


def native_fold_body(rank: int, world: int, port: int):
    """The engine's native fold (small all_reduce, clean op) gives the same bits as torch's fold:
    the last rank is forced onto the torch path, every result is compared bitwise across ranks
    and with ``reduce_fresh`` over every rank's input, recomputed here from the seeds."""
    from mooncake.backend import collectives
    from mooncake.backend.reduce_ops import _NATIVE_FOLD, reduce_fresh

    torch_path = rank == world - 1
    calls = {"reduce_fresh": 0}
    orig = collectives.reduce_fresh

    def counted(*a, **k):
        calls["reduce_fresh"] += 1
        return orig(*a, **k)

    collectives.reduce_fresh = counted
    if torch_path:
        collectives.native_fold = lambda dtype, name: None
    init(rank, world, port)

    def data(r: int, dtype, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 97 + r)
        if dtype.is_floating_point:  # wide dynamic range: the fold order shows in the bits
            return (torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
                -6, 7, (n,), generator=g)).to(dtype)  # fmt: skip
        return torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(dtype)

    ops = {
        "SUM": dist.ReduceOp.SUM,
        "PRODUCT": dist.ReduceOp.PRODUCT,
        "MIN": dist.ReduceOp.MIN,
        "MAX": dist.ReduceOp.MAX,
    }
    checks = 0
    for seed, ((dtype, name), _) in enumerate(sorted(_NATIVE_FOLD.items(), key=str)):
        for n in (1, 7, 256):
            t = data(rank, dtype, n, seed * 10 + n)
            dist.all_reduce(t, op=ops[name])
            want = torch.empty(n, dtype=dtype)
            reduce_fresh(want, [data(r, dtype, n, seed * 10 + n) for r in range(world)], name)
            assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), (dtype, name, n)
            everyone = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(everyone, t)
            assert all(torch.equal(e.view(torch.uint8), t.view(torch.uint8)) for e in everyone)
            checks += 1
    # Native ranks folded every op natively (no torch fold); the torch rank folded them all.
    assert (calls["reduce_fresh"] > 0) == torch_path, calls
    dist.destroy_process_group()
    return checks
