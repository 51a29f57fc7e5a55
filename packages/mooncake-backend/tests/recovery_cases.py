"""Rank bodies for recovery: the spec's snippets, run as written."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from harness import init


def _full_world_check(world: int, tag: int) -> None:
    t = torch.full((1000,), 1 << dist.get_rank(), dtype=torch.int64) + tag
    dist.all_reduce(t)
    exp = (1 << world) - 1 + world * tag
    assert torch.all(t == exp), f"full-world all_reduce: {int(t[0])} != {exp}"


def survivor(rank: int, world: int, port: int, victims: list):
    active = init(rank, world, port, timeout_s=30.0)
    return serve_and_recover(world, active, victims, 0)


def serve_and_recover(
    world: int, active, victims: list, first_round: int, die_after: int = -1
) -> int:
    """Serve ops; after each victim dies, poll get_peer_state and recover it (spec snippet)."""
    from mooncake import pg

    served = 0
    for round_no, broken_rank in enumerate(victims):
        if round_no < first_round:
            continue
        # Serve until the victim's death shows in active_ranks.
        while active[broken_rank] == 1:
            t = torch.ones(8)
            dist.all_reduce(t)
            served += 1
            time.sleep(0.005)
        # --- the spec's recovery snippet, verbatim ---
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        while True:
            (peer_state,) = pg.get_peer_state(backend, [broken_rank])
            if peer_state:
                pg.recover_ranks(backend, [broken_rank])
                break
            else:
                # Handle ongoing logic, like inference
                t = torch.ones(8)
                dist.all_reduce(t)
                served += 1
        # ---
        assert active.tolist() == [1] * world, f"active_ranks after recovery: {active.tolist()}"
        _full_world_check(world, round_no)
        if round_no == die_after:
            os.kill(os.getpid(), 9)
    dist.barrier()
    return served


def victim(rank: int, world: int, port: int, victims: list):
    init(rank, world, port, timeout_s=30.0)
    t = torch.ones(8)
    for _ in range(5):
        dist.all_reduce(t)
    os.kill(os.getpid(), 9)


def joiner(rank: int, world: int, port: int, round_no: int, victims: list):
    """The spec's joiner snippet (env:// rendezvous through the harness store)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # every rank is a store client
    from mooncake import pg

    t0 = time.monotonic()
    broken_rank, num_processes = rank, world
    # --- the spec's joiner snippet, verbatim ---
    dist.init_process_group(
        backend="mooncake-cpu",
        rank=broken_rank,
        world_size=num_processes,
        pg_options=pg.MooncakeBackendOptions(
            torch.ones((num_processes,), dtype=torch.int32),
            is_extension=True,  # Must set this option to True
        ),
    )
    # ---
    pg.join_group(dist.group.WORLD, timeout=30)
    _full_world_check(world, round_no)
    first_op = time.monotonic() - t0
    active = torch.ones(world, dtype=torch.int32)
    active.copy_(pg.get_active_ranks())
    # then serve like every survivor for the failures still to come
    serve_and_recover_live(world, victims, round_no + 1)
    return first_op


def serve_and_recover_live(world: int, victims: list, first_round: int) -> None:
    from mooncake import pg

    class Live:
        def __getitem__(self, r):
            return int(pg.get_active_ranks()[r])

        def tolist(self):
            return pg.get_active_ranks().tolist()

    serve_and_recover(world, Live(), victims, first_round)


def grow_survivor(rank: int, world: int, port: int, new_size: int):
    from mooncake import pg

    init(rank, world, port, timeout_s=30.0, max_world_size=new_size)
    assert dist.get_world_size() == world
    t = torch.ones(4)
    dist.all_reduce(t)
    assert torch.all(t == world)
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    pg.extend_group_size_to(backend, new_size, timeout=30)
    assert dist.get_world_size() == new_size
    _full_world_check(new_size, 7)
    dist.barrier()
    return pg.get_active_ranks().tolist()


def grow_joiner(rank: int, world: int, port: int, new_size: int):
    from harness import client_store

    from mooncake import pg

    dist.init_process_group(
        backend="mooncake-cpu",
        store=client_store(port),
        rank=rank,
        world_size=new_size,
        pg_options=pg.MooncakeBackendOptions(
            torch.ones(new_size, dtype=torch.int32), is_extension=True
        ),
    )
    pg.join_group(timeout=30)
    assert dist.get_world_size() == new_size
    _full_world_check(new_size, 7)
    dist.barrier()
    return pg.get_active_ranks().tolist()


def _survivor_then_victim(rank, world, port, victims):
    """Survives the first failure, helps recover it, then dies (second of two failures)."""
    active = init(rank, world, port, timeout_s=30.0)
    serve_and_recover(world, active, victims, 0, die_after=0)


def sub_survivor(rank: int, world: int, port: int, victim: int):
    """A subgroup containing the victim recovers with WORLD; the joiner re-creates it."""
    from mooncake import pg

    active = init(rank, world, port, timeout_s=30.0)
    sub = dist.new_group([victim, 0])  # any member order
    if rank in (0, victim):
        t = torch.ones(4)
        dist.all_reduce(t, group=sub)
        assert torch.all(t == 2)
    while active[victim] == 1:
        dist.all_reduce(torch.ones(4))
        time.sleep(0.005)
    if rank == 0:  # the subgroup notices too (op completes among its survivors)
        t = torch.full((4,), 5.0)
        dist.all_reduce(t, group=sub)
        assert torch.all(t == 5.0)
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    while True:
        (ready,) = pg.get_peer_state(backend, [victim])
        if ready:
            pg.recover_ranks(backend, [victim])
            break
        dist.all_reduce(torch.ones(4))
    _full_world_check(world, 3)
    if rank == 0:
        t = torch.full((4,), 3.0)
        dist.all_reduce(t, group=sub)
        assert torch.all(t == 3.0 + 7.0), f"subgroup after recovery: {t}"
    dist.barrier()
    return True


def sub_victim(rank: int, world: int, port: int, victim: int):
    init(rank, world, port, timeout_s=30.0)
    sub = dist.new_group([victim, 0])
    t = torch.ones(4)
    dist.all_reduce(t, group=sub)
    for _ in range(3):
        dist.all_reduce(torch.ones(4))
    os.kill(os.getpid(), 9)


def sub_joiner(rank: int, world: int, port: int, victim: int):
    from harness import client_store

    from mooncake import pg

    dist.init_process_group(
        backend="mooncake-cpu",
        store=client_store(port),
        rank=rank,
        world_size=world,
        pg_options=pg.MooncakeBackendOptions(
            torch.ones(world, dtype=torch.int32), is_extension=True
        ),
    )
    pg.join_group(timeout=30)
    sub = dist.new_group([victim, 0])  # re-created in the same order as the survivors did
    _full_world_check(world, 3)
    t = torch.full((4,), 7.0)
    dist.all_reduce(t, group=sub)
    assert torch.all(t == 10.0), f"joiner subgroup all_reduce: {t}"
    dist.barrier()
    return True
