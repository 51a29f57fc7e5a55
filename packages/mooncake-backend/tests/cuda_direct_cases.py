"""Rank bodies for the direct CUDA path (``backend/cuda_direct.py``): several processes share
the one GPU; results are compared with the exact CPU reference of ``ops_cases``."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from harness import client_store
from ops_cases import FLOATS, INTS, MOVE_ONLY, REDUCE_OPS, data, reference


def init_cuda(rank, world, port, path="direct", timeout_s=60.0, **opts):
    from datetime import timedelta

    from mooncake import pg

    torch.cuda.set_device(0)
    active = torch.ones(world, dtype=torch.int32, device="cuda")
    dist.init_process_group(
        backend="mooncake",
        store=client_store(port),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        pg_options=pg.MooncakeBackendOptions(active, cuda_path=path, **opts),
    )
    return active


def path_of(group=None):
    """(direct?, reason) of the group's CUDA path decision."""
    g = group or dist.group.WORLD
    return g._cuda.direct, g._cuda.reason


def _reduce_cases(world):
    for opname, op in REDUCE_OPS.items():
        for dtype in FLOATS + INTS + [torch.bool]:
            if opname in ("BAND", "BOR", "BXOR") and dtype.is_floating_point:
                continue
            if dtype == torch.bool and opname == "AVG":
                continue
            yield opname, op, dtype


def _same(a, b, what):
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype, f"{what}: {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: {a.shape} vs {b.shape}"
    if a.dtype.is_floating_point and a.dtype.itemsize == 1:
        a, b = a.float(), b.float()
    assert torch.equal(a, b), f"{what}: mismatch\n{a[:8]}\n{b[:8]}"


def direct_ops(rank, world, port, sizes=(1, 7, 1000, 40000)):
    """Every collective x dtype x reduce op of the CPU suite on CUDA tensors, direct path."""
    init_cuda(rank, world, port)
    checks = 0
    for n in sizes:
        for opname, op, dtype in _reduce_cases(world):
            t = data(rank, n, dtype, opname).cuda()
            dist.all_reduce(t, op=op)
            if dtype != torch.bool:
                _same(t, reference(world, n, dtype, opname), f"all_reduce {opname} {dtype} n={n}")
            else:  # bool SUM = any, PRODUCT = all ...: compare with the CPU fold
                exp = torch.stack([data(r, n, dtype, opname) for r in range(world)])
                ref = {"SUM": exp.any(0), "PRODUCT": exp.all(0), "MIN": exp.all(0),
                       "MAX": exp.any(0), "BAND": exp.all(0), "BOR": exp.any(0),
                       "BXOR": exp.sum(0) % 2 == 1}[opname]  # fmt: skip
                _same(t, ref, f"all_reduce {opname} bool n={n}")
            checks += 1
            # reduce_scatter (tensor and list forms)
            big = data(rank, world * n, dtype, opname).cuda()
            out = torch.empty(n, dtype=dtype, device="cuda")
            if dtype != torch.bool:
                dist.reduce_scatter_tensor(out, big, op=op)
                exp = reference(world, world * n, dtype, opname)[rank * n : (rank + 1) * n]
                _same(out, exp, f"reduce_scatter_tensor {opname} {dtype} n={n}")
                out2 = torch.empty(n, dtype=dtype, device="cuda")
                dist.reduce_scatter(out2, list(big.view(world, n).unbind(0)), op=op)
                _same(out2, exp, f"reduce_scatter {opname} {dtype} n={n}")
                checks += 2
        for dtype in FLOATS + INTS + MOVE_ONLY:
            mine = data(rank, n, dtype).cuda()
            for root in range(world):
                t = mine.clone()
                dist.broadcast(t, src=root)
                _same(t, data(root, n, dtype), f"broadcast root={root} {dtype}")
            outs = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(outs, mine)
            for r in range(world):
                _same(outs[r], data(r, n, dtype), f"all_gather {dtype}")
            big = torch.empty(world * n, dtype=dtype, device="cuda")
            dist.all_gather_into_tensor(big, mine)
            _same(big, torch.cat([data(r, n, dtype) for r in range(world)]), f"agit {dtype}")
            checks += 3
    direct, reason = path_of()
    assert direct, reason
    # async_op: wait() orders the current stream; a side stream's result is visible after it
    t = torch.full((1 << 20,), float(rank + 1), device="cuda")
    w = dist.all_reduce(t, async_op=True)
    w.wait()
    assert torch.all(t == world * (world + 1) / 2).item()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        u = torch.full((4096,), float(rank), device="cuda")
        dist.all_reduce(u)
        v = u * 2  # on s, after the all_reduce
    s.synchronize()
    assert torch.all(v == world * (world - 1)).item()
    # the staged collectives still work in the same group
    outs = [torch.empty(5, device="cuda") for _ in range(world)] if rank == 0 else None
    dist.gather(torch.full((5,), float(rank), device="cuda"), outs, dst=0)
    if rank == 0:
        assert all(torch.all(o == r).item() for r, o in enumerate(outs))
    inp = torch.arange(world * 4, device="cuda", dtype=torch.int64) + 100 * rank
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp)
    dist.barrier()
    dist.destroy_process_group()
    return checks


def direct_kill(rank, world, port, victim, n=1 << 18, after=20):
    """A tight loop of device all_reduces (nothing synchronizes); the victim SIGKILLs itself
    after ``after`` ops. Survivors return every result they saw, to be compared."""
    active = init_cuda(rank, world, port, timeout_s=20.0)
    seen = []
    t0 = None
    i = 0
    while True:
        x = torch.full((n,), float(1 << rank), device="cuda")
        dist.all_reduce(x)
        if rank == victim and i == after:
            os.kill(os.getpid(), 9)
        i += 1
        if i % 8 and t0 is None:
            continue  # enqueue several ops before looking at a result
        if t0 is None and rank != victim and i > after:
            t0 = time.monotonic()
        mask = sum(1 << r for r, a in enumerate(active.tolist()) if a)
        got = int(x[-1].item())
        assert torch.all(x == got).item(), "torn result"
        seen.append((i, got))
        if not active[victim].item():
            # the op that excluded the victim counted it or not, but the next one must not
            x = torch.full((n,), float(1 << rank), device="cuda")
            dist.all_reduce(x)
            assert int(x[0].item()) == mask, f"{int(x[0].item())} != contributors {mask}"
            break
        assert i < 100000, "victim never marked"
    elapsed = time.monotonic() - (t0 or time.monotonic())
    assert path_of()[0], path_of()[1]
    dist.barrier()
    return active.tolist(), seen[-3:], elapsed


def direct_recover_survivor(rank, world, port, victim):
    from mooncake import pg

    active = init_cuda(rank, world, port, timeout_s=30.0)
    t = torch.ones(1000, device="cuda")
    while active[victim].item() == 1:
        dist.all_reduce(t)
        t.fill_(1.0)
        time.sleep(0.005)
    backend = dist.group.WORLD._get_backend(torch.device("cuda"))
    deadline = time.monotonic() + 90
    while True:
        (ready,) = pg.get_peer_state(backend, [victim])
        if ready:
            pg.recover_ranks(backend, [victim])
            break
        dist.all_reduce(t)
        assert time.monotonic() < deadline, "replacement never ready"
    return _after_recovery(rank, world, active)


def direct_recover_joiner(rank, world, port):
    from datetime import timedelta

    from mooncake import pg

    torch.cuda.set_device(0)
    active = torch.ones(world, dtype=torch.int32, device="cuda")
    dist.init_process_group(
        backend="mooncake",
        store=client_store(port),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
        pg_options=pg.MooncakeBackendOptions(active, is_extension=True, cuda_path="direct"),
    )
    pg.join_group(timeout=90)
    return _after_recovery(rank, world, active)


def _after_recovery(rank, world, active):
    assert active.tolist() == [1] * world, active.tolist()
    for n in (1000, 1 << 20):
        x = torch.full((n,), float(1 << rank), device="cuda")
        dist.all_reduce(x)
        assert torch.all(x == (1 << world) - 1).item(), int(x[0].item())
        outs = torch.empty(world * n, device="cuda")
        dist.all_gather_into_tensor(outs, torch.full((n,), float(rank), device="cuda"))
        assert torch.equal(outs.cpu(), torch.arange(world).float().repeat_interleave(n))
    direct, reason = path_of()
    assert direct, reason
    dist.barrier()
    return "ok"


def direct_capture(rank, world, port):
    """CUDA graph capture of a collective raises a clear error; the group stays usable."""
    init_cuda(rank, world, port)
    t = torch.ones(1024, device="cuda")
    dist.all_reduce(t)  # decided and warmed up outside the capture
    errors = []
    big = torch.empty(1024 * world, device="cuda")
    small = torch.empty(1024 // world, device="cuda")
    for name, fn in (
        ("all_reduce", lambda: dist.all_reduce(t)),
        ("all_gather", lambda: dist.all_gather_into_tensor(big, t)),
        ("reduce_scatter", lambda: dist.reduce_scatter_tensor(small, t)),
    ):
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
                fn()
        except RuntimeError as e:
            errors.append(str(e))
        else:
            raise AssertionError(f"{name} was captured without error")
    assert all("CUDA graph" in e for e in errors), errors
    t = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    assert torch.all(t == world * (world + 1) / 2).item()
    dist.barrier()
    return errors[0]
