"""Rank bodies for growth and joining as real clients do it (Mooncake's elastic test, SGLang).

The behaviours, written as our own tests: ``extend_group_size_to`` without ``max_world_size``
(non-blocking; the next collective admits the new ranks), new ranks that start with a plain
``init_process_group(world_size=n)``, ``get_num_synced_ranks``, a replacement started with
``MooncakeBackendOptions(ones, True)`` (positional), SGLang's positional ``max_world_size`` with an
``active_ranks`` longer than the group, and internal allocations under ``set_default_device``.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from harness import client_store

from mooncake import pg

CPU = torch.device("cpu")


def _init(rank: int, world: int, port: int, opts=None, timeout_s: float = 60.0) -> None:
    dist.init_process_group(
        backend="mooncake-cpu",
        store=client_store(port),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        pg_options=opts,
    )


def _sum_check(world: int, tag: int = 0, group=None) -> None:
    """all_reduce of distinct bits: the result names exactly the contributing ranks."""
    t = torch.full((16,), 1 << dist.get_rank(), dtype=torch.int64, device=CPU)
    dist.all_reduce(t, group=group)
    exp = (1 << world) - 1
    assert torch.all(t == exp), f"tag {tag}: all_reduce gave {int(t[0]):#x}, expected {exp:#x}"


def _flag(port: int, key: str, wait: bool = False, timeout_s: float = 60.0) -> None:
    st = client_store(port)
    if wait:
        st.wait([key], timedelta(seconds=timeout_s))
    else:
        st.set(key, "1")


# ----------------------------------------------------------------------------- growth
def grow_old(rank: int, world: int, port: int, new_size: int, window: float, meta: bool):
    """Ranks of the running group: no pg_options at all, as the reference's elastic test."""
    if meta:
        torch.set_default_device("meta")
    _init(rank, world, port)
    _sum_check(world)
    t0 = time.monotonic()
    pg.extend_group_size_to(dist.group.WORLD, new_size, timeout=window)
    returned_after = time.monotonic() - t0
    assert dist.get_world_size() == new_size, dist.get_world_size()
    _flag(port, f"extended/{rank}")  # the new ranks start only now: extend did not wait
    _sum_check(new_size, 1)  # the first op admits them: a full-group op
    active = pg.get_active_ranks(dist.group.WORLD._get_backend(CPU)).tolist()
    assert active == [1] * new_size, active
    assert pg.get_num_synced_ranks(dist.group.WORLD) == new_size
    dist.barrier()
    return returned_after


def grow_new(rank: int, world: int, port: int, new_size: int, old_size: int):
    """A new rank: plain init_process_group(world_size=new_size), no is_extension, no options."""
    for r in range(old_size):
        _flag(port, f"extended/{r}", wait=True)
    _init(rank, new_size, port)
    assert dist.get_world_size() == new_size
    _sum_check(new_size, 1)  # its very first op includes the old ranks
    assert pg.get_active_ranks().tolist() == [1] * new_size
    assert pg.get_num_synced_ranks(dist.group.WORLD) == new_size
    dist.barrier()
    return True


def window_old(rank: int, world: int, port: int, new_size: int, window: float):
    """extend to new_size; the last new rank misses the join window: it counts as failed, the
    op completes among the others, and the late rank is later admitted like a replacement."""
    _init(rank, world, port)
    _flag(port, "window/inited", wait=True)  # the punctual new rank is up (start-up is slow here)
    pg.extend_group_size_to(dist.group.WORLD, new_size, timeout=window)
    t0 = time.monotonic()
    _window_first_op(rank, new_size)
    waited = time.monotonic() - t0
    if rank == 0:
        _flag(port, "late/go")
    _admit_late(new_size)
    return waited


def _window_first_op(rank: int, new_size: int) -> None:
    t = torch.full((4,), 1 << rank, dtype=torch.int64, device=CPU)
    dist.all_reduce(t)
    present = (1 << (new_size - 1)) - 1  # every rank but the last
    assert torch.all(t == present), f"{int(t[0]):#x} != {present:#x}"
    assert pg.get_active_ranks().tolist() == [1] * (new_size - 1) + [0]
    assert dist.get_world_size() == new_size


def _admit_late(new_size: int) -> None:
    """The spec's recovery loop (every member, in step), serving meanwhile."""
    late = new_size - 1
    while True:
        (ready,) = pg.get_peer_state(dist.group.WORLD, [late])
        if ready:
            pg.recover_ranks(dist.group.WORLD, [late], timeout=30)
            break
        dist.all_reduce(torch.ones(2, device=CPU))
        time.sleep(0.01)
    _sum_check(new_size, 2)
    dist.barrier()


def window_new(rank: int, world: int, port: int, new_size: int, late: bool):
    if late:  # starts after the window closed: a plain init, admitted like a replacement
        _flag(port, "late/go", wait=True)
        _init(rank, new_size, port)
        _sum_check(new_size, 2)
        dist.barrier()
        return True
    _init(rank, new_size, port)
    _flag(port, "window/inited")
    _window_first_op(rank, new_size)
    _admit_late(new_size)
    return True


# ----------------------------------------------------------------------------- deferred join
def deferred_member(rank: int, world: int, port: int, broken: int):
    """get_num_synced_ranks until everyone is connected; then ``broken`` simply returns (its
    process exits) and the others go on, then admit its replacement."""
    _init(rank, world, port)
    backend = dist.group.WORLD._get_backend(CPU)
    deadline = time.monotonic() + 60
    while pg.get_num_synced_ranks(backend) < world:
        assert time.monotonic() < deadline, "get_num_synced_ranks never reached the world size"
        time.sleep(0.05)
    if rank == broken:
        return "left"
    t = torch.full((4,), 1 << rank, dtype=torch.int64, device=CPU)
    dist.all_reduce(t)
    assert torch.all(t == ((1 << world) - 1) & ~(1 << broken)), f"{int(t[0]):#x}"
    assert pg.get_active_ranks(dist.group.WORLD).tolist() == [
        int(r != broken) for r in range(world)
    ]
    assert pg.get_num_synced_ranks(backend) == world  # never decreases: it was synced
    if rank == 0:
        _flag(port, "recover")
    while True:
        (ready,) = pg.get_peer_state(backend, [broken])
        if ready:
            break
        dist.all_reduce(torch.ones(2, device=CPU))
    _flag(port, "join_ready", wait=True)
    pg.recover_ranks(backend, [broken])
    _sum_check(world, 3)
    return "ok"


def peer_state_of_dead_member(rank: int, world: int, port: int, victim: int):
    """``victim`` dies right after everyone is connected; the survivors' very next call is
    get_peer_state([victim]) (no op in between, as SGLang's recovery poll): it must answer False
    (the dead incarnation is not "connected"), and exclude the victim."""
    import os

    _init(rank, world, port)
    backend = dist.group.WORLD._get_backend(CPU)
    deadline = time.monotonic() + 60
    while pg.get_num_synced_ranks(backend) < world:
        assert time.monotonic() < deadline, "get_num_synced_ranks never reached the world size"
        time.sleep(0.05)
    if rank == victim:
        _flag(port, "dying")
        os._exit(0)
    _flag(port, "dying", wait=True)
    time.sleep(0.5)
    (ready,) = pg.get_peer_state(backend, [victim])
    assert ready is False, "get_peer_state reported a dead member as ready"
    active = pg.get_active_ranks(dist.group.WORLD).tolist()
    assert active == [int(r != victim) for r in range(world)], active
    t = torch.full((4,), 1 << rank, dtype=torch.int64, device=CPU)
    dist.all_reduce(t)
    assert torch.all(t == ((1 << world) - 1) & ~(1 << victim)), f"{int(t[0]):#x}"
    return "ok"


def deferred_joiner(rank: int, world: int, port: int):
    _flag(port, "recover", wait=True)
    ones = torch.ones((world,), dtype=torch.int32, device=CPU)
    _init(rank, world, port, pg.MooncakeBackendOptions(ones, True))  # positional is_extension
    assert pg.get_num_synced_ranks(dist.group.WORLD) == 1  # local-only until admitted
    t = torch.full((4,), 1 << rank, dtype=torch.int64, device=CPU)
    dist.all_reduce(t)  # local-only: only itself contributes
    assert torch.all(t == 1 << rank), f"{int(t[0]):#x}"
    _flag(port, "join_ready")
    pg.join_group(dist.group.WORLD, timeout=60)
    _sum_check(world, 3)
    assert ones.tolist() == [1] * world
    assert pg.get_num_synced_ranks(dist.group.WORLD) == world
    return "ok"


# ----------------------------------------------------------------------------- SGLang options
def sglang_options(rank: int, world: int, port: int, max_ws: int, local_sync: bool):
    """SGLang's parallel_state: MooncakeBackendOptions(active_ranks, recovered_rank,
    max_world_size) positionally, active_ranks of max_world_size entries (0 beyond the group),
    for WORLD and new_group subgroups; membership read through a view of the tensor."""
    active = torch.zeros(max_ws, dtype=torch.int32, device=CPU)
    active[:world] = 1
    _init(rank, world, port, pg.MooncakeBackendOptions(active, False, max_ws))
    ptr = active.data_ptr()
    ranks = list(range(world))
    sub_active = torch.zeros(max_ws, dtype=torch.int32, device=CPU)
    sub_active[: len(ranks)] = 1
    view = sub_active[: len(ranks)]  # as GroupCoordinator keeps it
    sub = dist.new_group(
        ranks,
        backend="mooncake-cpu",
        pg_options=pg.MooncakeBackendOptions(sub_active, False, max_ws),
        use_local_synchronization=local_sync,
    )
    _sum_check(world, 0)
    _sum_check(world, 1, group=sub)
    assert active.data_ptr() == ptr
    assert active.tolist() == [1] * world + [0] * (max_ws - world), active.tolist()
    assert view.tolist() == [1] * world
    for g in (dist.group.WORLD, dist.group.WORLD._get_backend(CPU), sub, sub._get_backend(CPU)):
        assert pg.get_active_ranks(g).tolist() == [1] * world + [0] * (max_ws - world)
        assert pg.get_num_synced_ranks(g) == world
        # collective among the members; members count as ready ("connected"), in any order
        assert pg.get_peer_state(g, list(range(world))[::-1]) == [True] * world
        pg.recover_ranks(g, list(range(world)))  # members already: nothing to do
    errors = []
    for bad in (world - 1, max_ws + 1):
        try:
            pg.extend_group_size_to(dist.group.WORLD, bad)
        except ValueError as e:
            errors.append(str(e))
    assert "smaller" in errors[0], errors
    assert f"new_size={world - 1}" in errors[0], errors
    assert f"max_world_size={max_ws}" in errors[1], errors
    assert f"new_size={max_ws + 1}" in errors[1], errors
    assert len(errors) == 2, errors
    # A new rank admitted into a reserved slot writes 1 into the same tensor, in place.
    if rank == 0:
        _flag(port, "sglang/go")
    while True:
        (ready,) = pg.get_peer_state(dist.group.WORLD, [world])
        if ready:
            pg.recover_ranks(dist.group.WORLD, [world], timeout=30)
            break
        dist.all_reduce(torch.ones(2, device=CPU))
        time.sleep(0.01)
    assert active.data_ptr() == ptr
    assert active.tolist() == [1] * (world + 1) + [0] * (max_ws - world - 1), active.tolist()
    assert dist.get_world_size() == world + 1
    _sum_check(world + 1, 2)
    _sum_check(world, 3, group=sub)  # the subgroup is unchanged
    return True


def sglang_new_rank(rank: int, world: int, port: int, max_ws: int):
    _flag(port, "sglang/go", wait=True)
    active = torch.ones(max_ws, dtype=torch.int32, device=CPU)
    _init(rank, max_ws, port, pg.MooncakeBackendOptions(active, True, max_ws))
    pg.join_group(dist.group.WORLD, timeout=60)
    assert active.tolist() == [1] * (rank + 1) + [0] * (max_ws - rank - 1), active.tolist()
    assert dist.get_world_size() == rank + 1
    _sum_check(rank + 1, 2)
    return True


# ----------------------------------------------------------------------------- default device
def default_device_meta(rank: int, world: int, port: int, with_options: bool):
    """Clients call torch.set_default_device(...) (and DeepEP set_default_dtype(bfloat16))
    before collectives: nothing the backend allocates may follow them."""
    torch.set_default_device("meta")
    torch.set_default_dtype(torch.bfloat16)
    opts = None
    if with_options:
        opts = pg.MooncakeBackendOptions(torch.ones(world, dtype=torch.int32, device=CPU))
    _init(rank, world, port, opts)
    checks = 0
    for n in (7, 300_000):  # the small native path and the large (arena / pipelined) one
        t = torch.arange(n, dtype=torch.float32, device=CPU) * (rank + 1)
        dist.all_reduce(t)
        exp = torch.arange(n, dtype=torch.float32, device=CPU) * sum(range(1, world + 1))
        assert torch.equal(t, exp), f"all_reduce n={n}"
        checks += 1
    t = (
        torch.arange(5, dtype=torch.int64, device=CPU)
        if rank == 0
        else torch.zeros(5, dtype=torch.int64, device=CPU)
    )
    dist.broadcast(t, src=0)
    assert t.tolist() == list(range(5))
    outs = [torch.zeros(3, dtype=torch.int32, device=CPU) for _ in range(world)]
    dist.all_gather(outs, torch.full((3,), rank, dtype=torch.int32, device=CPU))
    assert [int(o[0]) for o in outs] == list(range(world))
    out = torch.zeros(2, dtype=torch.float64, device=CPU)
    dist.reduce_scatter_tensor(out, torch.ones(2 * world, dtype=torch.float64, device=CPU))
    assert out.tolist() == [float(world)] * 2
    a2a = torch.zeros(world, dtype=torch.int64, device=CPU)
    dist.all_to_all_single(a2a, torch.full((world,), rank, dtype=torch.int64, device=CPU))
    assert a2a.tolist() == list(range(world))
    dist.barrier()
    peer = (rank + 1) % world
    got = torch.zeros(4, dtype=torch.int32, device=CPU)
    ops = [
        dist.P2POp(dist.isend, torch.full((4,), rank, dtype=torch.int32, device=CPU), peer),
        dist.P2POp(dist.irecv, got, (rank - 1) % world),
    ]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    assert got.tolist() == [(rank - 1) % world] * 4
    checks += 6
    active = pg.get_active_ranks()
    assert active.device.type == "cpu"
    assert active.dtype == torch.int32
    assert active.tolist() == [1] * world
    assert torch.empty(1).device.type == "meta"  # the client's setting is still in force
    dist.destroy_process_group()
    return checks


# ----------------------------------------------------------------------------- SGLang recovery
def _sglang_groups(rank: int, world: int, port: int, recovered: bool):
    """WORLD and a TP-like subgroup as SGLang's parallel_state creates them (positional
    options; the replacement passes recovered_rank=True for the subgroup too)."""
    active = torch.ones(world, dtype=torch.int32, device=CPU)
    _init(rank, world, port, pg.MooncakeBackendOptions(active, recovered), timeout_s=30.0)
    sub_active = torch.ones(world, dtype=torch.int32, device=CPU)
    sub = dist.new_group(
        list(range(world)),
        backend="mooncake-cpu",
        pg_options=pg.MooncakeBackendOptions(sub_active, recovered),
    )
    return active, sub, sub_active


def _full_world_after_recovery(world: int, active, sub, sub_active) -> bool:
    """Both WORLD and the subgroup run full-world ops, and both active_ranks tensors say so."""
    _sum_check(world, 4)
    _sum_check(world, 5, group=sub)
    assert active.tolist() == [1] * world
    assert sub_active.tolist() == [1] * world
    return True


def sglang_recover_member(rank: int, world: int, port: int, victim: int):
    import os

    active, sub, sub_active = _sglang_groups(rank, world, port, False)
    for _ in range(3):
        dist.all_reduce(torch.ones(2, device=CPU))
        dist.all_reduce(torch.ones(2, device=CPU), group=sub)
    if rank == victim:
        os.kill(os.getpid(), 9)
    while active[victim] == 1:  # serve until the failure shows
        dist.all_reduce(torch.ones(2, device=CPU))
        time.sleep(0.005)
    # elastic_ep.try_recover_ranks: WORLD first, then every group (sub's failure is not even
    # noticed yet: it ran no op since the death).
    while True:
        if all(pg.get_peer_state(dist.group.WORLD, [victim])):
            pg.recover_ranks(dist.group.WORLD, [victim])
            break
        dist.all_reduce(torch.ones(2, device=CPU))
        time.sleep(0.01)
    deadline = time.monotonic() + 30
    while not all(pg.get_peer_state(sub, [victim])):  # _wait_for_peer_state: no serving op
        assert time.monotonic() < deadline, "subgroup peer state never became ready"
        time.sleep(0.01)
    pg.recover_ranks(sub, [victim])
    return _full_world_after_recovery(world, active, sub, sub_active)


def sglang_recover_joiner(rank: int, world: int, port: int, victim: int):
    active, sub, sub_active = _sglang_groups(rank, world, port, True)
    pg.join_group(dist.group.WORLD, timeout=60)  # elastic_ep.join_process_groups
    pg.join_group(sub, timeout=60)
    return _full_world_after_recovery(world, active, sub, sub_active)


# ----------------------------------------------------------------------------- CUDA ("mooncake")
def cuda_growth(rank: int, world: int, port: int, new_size: int):
    """set_default_device('cuda') before init, as DeepEP/Mooncake EP do; WORLD without options
    (internal active_ranks on the GPU) grows by a plain new rank; a subgroup with SGLang's
    positional options and a longer CUDA active_ranks is written in place."""
    torch.cuda.set_device(0)
    torch.set_default_device("cuda")
    cuda = torch.device("cuda", 0)
    if rank >= world:
        for r in range(world):
            _flag(port, f"cuda/extended/{r}", wait=True)
    dist.init_process_group(
        backend="mooncake",
        store=client_store(port),
        rank=rank,
        world_size=world if rank < world else new_size,
        timeout=timedelta(seconds=60),
    )
    if rank < world:
        t = torch.full((8,), float(rank + 1), device=cuda)
        dist.all_reduce(t)
        assert torch.all(t == world * (world + 1) / 2).item()
        pg.extend_group_size_to(dist.group.WORLD, new_size)
        _flag(port, f"cuda/extended/{rank}")
    t = torch.full((300_000,), float(rank + 1), device=cuda)
    dist.all_reduce(t)
    assert torch.all(t == new_size * (new_size + 1) / 2).item()
    backend = dist.group.WORLD._get_backend(cuda)
    assert backend.active_ranks.device.type == "cuda"
    assert pg.get_active_ranks(backend).tolist() == [1] * new_size
    sub_active = torch.zeros(new_size + 1, dtype=torch.int32, device=cuda)
    sub_active[:new_size] = 1
    view = sub_active[:new_size]
    sub = dist.new_group(
        list(range(new_size)),
        backend="mooncake",
        pg_options=pg.MooncakeBackendOptions(sub_active, False, new_size + 1),
    )
    t = torch.full((5,), 1 << rank, dtype=torch.int64, device=cuda)
    dist.all_reduce(t, group=sub)
    assert torch.all(t == (1 << new_size) - 1).item()
    assert view.tolist() == [1] * new_size
    assert sub_active.tolist() == [1] * new_size + [0]
    dist.barrier()
    return True
