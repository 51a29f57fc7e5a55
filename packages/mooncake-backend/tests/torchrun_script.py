"""Launched by torchrun (env://): a few ops on "mooncake-cpu" compared with gloo, and
mp.spawn-free."""

import os
import sys

import torch
import torch.distributed as dist

import mooncake.pg  # noqa: F401  (registers the backends)

dist.init_process_group(backend="mooncake-cpu")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == int(os.environ["WORLD_SIZE"])
gloo = dist.new_group(backend="gloo")
for n in (3, 70000):
    a = torch.arange(n, dtype=torch.float32) * (rank + 1)
    b = a.clone()
    dist.all_reduce(a)
    dist.all_reduce(b, group=gloo)
    assert torch.equal(a, b), "all_reduce differs from gloo"
    outs = [torch.empty(n) for _ in range(world)]
    dist.all_gather(outs, a)
    assert all(torch.equal(o, a) for o in outs)
    t = torch.full((n,), float(rank))
    dist.broadcast(t, src=world - 1)
    assert torch.all(t == world - 1)
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} OK", flush=True)
sys.exit(0)
