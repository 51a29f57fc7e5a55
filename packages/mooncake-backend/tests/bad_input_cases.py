from __future__ import annotations

import torch
import torch.distributed as dist
from harness import client_store, init


def _expect(exc_type, fn, *words):
    try:
        fn()
    except exc_type as e:
        msg = str(e)
        for w in words:
            assert w in msg, f"error message {msg!r} lacks {w!r}"
        return msg
    raise AssertionError(f"{fn} did not raise {exc_type.__name__}")


def mismatches(rank: int, world: int, port: int):
    from mooncake import pg

    init(rank, world, port, timeout_s=20.0)
    errs = []
    # shape mismatch
    t = torch.ones(10 + rank)
    errs.append(_expect(pg.OpMismatchError, lambda: dist.all_reduce(t)))
    # dtype mismatch
    t = torch.ones(10, dtype=torch.float32 if rank == 0 else torch.int32)
    errs.append(_expect(pg.OpMismatchError, lambda: dist.all_reduce(t)))
    # reduce-op mismatch
    t = torch.ones(10)
    errs.append(
        _expect(
            pg.OpMismatchError,
            lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM if rank else dist.ReduceOp.MAX),
        )
    )
    # different collectives
    t = torch.ones(10)
    errs.append(
        _expect(
            pg.OpMismatchError,
            lambda: dist.all_reduce(t) if rank == 0 else dist.broadcast(t, src=0),
        )
    )
    # large shape mismatch (bulk path)
    t = torch.ones(100000 + rank)
    errs.append(_expect(pg.OpMismatchError, lambda: dist.all_reduce(t)))
    # the group still works afterwards, nobody was marked failed
    t = torch.ones(10)
    dist.all_reduce(t)
    assert torch.all(t == world)
    assert pg.get_active_ranks().tolist() == [1] * world
    # local validation: same error on every rank, nothing sent
    nc = torch.ones(4, 4).t()
    _expect(ValueError, lambda: dist.all_reduce(nc), "contiguous")
    meta = torch.ones(4, device="meta")
    _expect(ValueError, lambda: dist.all_reduce(meta), "meta")
    _expect(ValueError, lambda: dist.broadcast(torch.ones(2), src=world + 3), "root rank")
    _expect(
        ValueError, lambda: dist.all_gather([torch.ones(2)] * (world + 1), torch.ones(2)), "ranks"
    )
    _expect(
        ValueError,
        lambda: dist.all_to_all_single(
            torch.ones(world), torch.ones(world), [1] * world, [2] * world
        ),
        "split",
    )
    _expect(ValueError, lambda: dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BAND), "BAND")
    t = torch.ones(10)
    dist.all_reduce(t)
    assert torch.all(t == world)
    dist.destroy_process_group()
    return errs


def wrong_active_ranks_size(rank: int, world: int, port: int):
    from mooncake import pg

    msg = _expect(
        ValueError,
        lambda: dist.init_process_group(
            backend="mooncake-cpu",
            store=client_store(port),
            rank=rank,
            world_size=world,
            pg_options=pg.MooncakeBackendOptions(torch.ones(world - 1, dtype=torch.int32)),
        ),
        "active_ranks",
        f"has {world - 1} entries",
        f"world_size={world}",
    )  # (a longer one is accepted: slots past the group read 0, see test_elastic_growth)
    _expect(ValueError, lambda: pg.MooncakeBackendOptions(torch.ones(world)), "int32")
    _expect(TypeError, lambda: pg.MooncakeBackendOptions([1, 1]), "torch.Tensor")
    return msg
