"""CUDA tensors on the "mooncake" backend: several processes share the one GPU."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from harness import client_store


def _init(rank, world, port):
    from datetime import timedelta

    from mooncake import pg

    torch.cuda.set_device(0)
    active = torch.ones(world, dtype=torch.int32, device="cuda")
    dist.init_process_group(
        backend="mooncake",
        store=client_store(port),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
        pg_options=pg.MooncakeBackendOptions(active),
    )
    return active


def cuda_ops(rank, world, port):
    active = _init(rank, world, port)
    checks = 0
    for n in (5, 300000):
        t = torch.full((n,), float(rank + 1), device="cuda")
        dist.all_reduce(t)
        assert torch.all(t == world * (world + 1) / 2).item()
        outs = [torch.empty(n, device="cuda") for _ in range(world)]
        dist.all_gather(outs, torch.full((n,), float(rank), device="cuda"))
        assert all(torch.all(o == r).item() for r, o in enumerate(outs))
        b = torch.full((n,), float(rank), device="cuda", dtype=torch.bfloat16)
        dist.broadcast(b, src=world - 1)
        assert torch.all(b == world - 1).item()
        inp = torch.arange(world * 4, device="cuda", dtype=torch.int64) + 100 * rank
        out = torch.empty_like(inp)
        dist.all_to_all_single(out, inp)
        exp = torch.cat(
            [torch.arange(rank * 4, rank * 4 + 4, device="cuda") + 100 * s for s in range(world)]
        )
        assert torch.equal(out, exp)
        checks += 4
    assert active.device.type == "cuda"
    assert active.tolist() == [1] * world
    err = None
    try:
        dist.all_reduce(torch.ones(3))  # CPU tensor on the CUDA backend: clear error
    except ValueError as e:
        err = e
    if err is None:
        raise AssertionError("CPU tensor accepted by the 'mooncake' backend")
    assert "mooncake-cpu" in str(err)
    dist.barrier()
    dist.destroy_process_group()
    return checks


def cuda_kill(rank, world, port, victim):
    active = _init(rank, world, port)
    t = torch.ones(1000, device="cuda")
    for _ in range(3):
        dist.all_reduce(t)
        t.fill_(1.0)
    if rank == victim:
        os.kill(os.getpid(), 9)
    t0 = time.monotonic()
    while True:
        x = torch.full((1000,), float(1 << rank), device="cuda")
        dist.all_reduce(x)
        mask = sum(1 << r for r, a in enumerate(active.tolist()) if a)
        assert int(x[0].item()) == mask, f"{int(x[0].item())} != contributors {mask}"
        if not active[victim].item():
            break
        assert time.monotonic() - t0 < 30, "victim never marked"
    dist.barrier()
    return active.tolist()
