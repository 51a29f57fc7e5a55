from __future__ import annotations

import time

import torch
import torch.distributed as dist
from harness import init


def init_method_body(rank: int, world: int, port: int, method: str):
    """init_process_group through tcp:// or file:// instead of the harness store."""
    from mooncake import pg

    dist.init_process_group(
        backend="mooncake-cpu",
        init_method=method,
        rank=rank,
        world_size=world,
        pg_options=pg.MooncakeBackendOptions(torch.ones(world, dtype=torch.int32)),
    )
    t = torch.full((10,), float(rank + 1))
    dist.all_reduce(t)
    assert torch.all(t == world * (world + 1) / 2)
    dist.barrier()
    dist.destroy_process_group()
    return True


def slow_rank_body(rank: int, world: int, port: int, slow: int, delay: float):
    """A rank that is 3x the heartbeat timeout late (but alive) is waited for, not failed."""
    active = init(rank, world, port, timeout_s=30.0, heartbeat_timeout=0.5)
    for i in range(5):
        if rank == slow and i == 2:
            time.sleep(delay)  # Python busy elsewhere; the engine's threads still answer heartbeats
        t = torch.ones(100)
        dist.all_reduce(t)
        assert torch.all(t == world), "a slow rank was dropped"
    assert active.tolist() == [1] * world
    return True


def stopped_rank_body(rank: int, world: int, port: int, victim: int, ready_path: str):
    """Loop all_reduce; the driver SIGSTOPs the victim; survivors report when it was excluded."""
    active = init(rank, world, port, timeout_s=30.0, heartbeat_timeout=0.5)
    dist.barrier()
    open(f"{ready_path}.{rank}", "w").close()
    t_excluded = None
    for _ in range(100000):
        t = torch.full((64,), float(1 << rank))
        dist.all_reduce(t)
        mask = sum(1 << r for r, a in enumerate(active.tolist()) if a)
        assert int(t[0]) == mask
        if not active[victim]:
            t_excluded = time.time()
            break
        time.sleep(0.002)
    return t_excluded


def idle_cpu_body(rank, world, port):
    import time

    import torch
    import torch.distributed as dist
    from harness import init

    init(rank, world, port)
    dist.all_reduce(torch.ones(4))
    t0 = time.process_time()
    w0 = time.monotonic()
    time.sleep(5.0)
    cpu = time.process_time() - t0
    dist.barrier()
    return 100.0 * cpu / (time.monotonic() - w0)
