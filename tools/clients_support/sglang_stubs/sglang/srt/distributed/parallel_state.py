"""Stand-in for ``sglang.srt.distributed.parallel_state``: group creation as SGLang does it on the
Mooncake backend.

The two Mooncake blocks (``GroupCoordinator.__init__``'s per-subgroup loop and
``init_distributed_environment``'s WORLD options) follow
``sglang-0005973/parallel_state.EXCERPT.py`` line by line:
``MooncakeBackendOptions(active_ranks, recovered_rank[, max_world_size])`` with the arguments
positional, ``active_ranks`` of ``max_world_size`` entries when it is given, and a
``"mooncake"`` device group next to a ``"mooncake-cpu"`` CPU group. One addition: with the CPU
device (the driver's ``--device cpu``) the device group is a ``"mooncake-cpu"`` group too.

``_groups`` holds weak references to every coordinator, as in SGLang (``elastic_ep.py`` walks it).
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

_MODEL_PARALLEL_GROUP_TIMEOUT: Optional[timedelta] = None
_groups: dict[str, Any] = {}
_group_name_counter: dict[str, int] = {}
_WORLD: Optional[GroupCoordinator] = None
_TP: Optional[GroupCoordinator] = None


def _get_unique_name(name: str) -> str:
    index = _group_name_counter.get(name, 0)
    _group_name_counter[name] = index + 1
    return f"{name}:{index}"


def _device_backend(device: torch.device) -> str:
    return "mooncake" if device.type == "cuda" else "mooncake-cpu"


class GroupCoordinator:
    """The parts of SGLang's ``GroupCoordinator`` that ``elastic_ep.py`` and the dispatcher use."""

    def __init__(
        self,
        group_ranks: list[list[int]],
        local_rank: int,
        torch_distributed_backend: str,
        group_name: str,
        device: torch.device,
        recovered_rank: bool = False,
        max_world_size: Optional[int] = None,
        use_local_synchronization: bool = False,
    ) -> None:
        self.unique_name = _get_unique_name(group_name)
        _groups[self.unique_name] = weakref.ref(self)
        self.rank = dist.get_rank()
        self.local_rank = local_rank
        self.device = device
        self.device_group = None
        self.cpu_group = None
        self.use_message_queue_broadcaster = False
        self.mq_broadcaster = None
        for ranks in group_ranks:
            subgroup_timeout = _MODEL_PARALLEL_GROUP_TIMEOUT
            if "mooncake" in torch_distributed_backend:
                from mooncake.pg import MooncakeBackendOptions

                pg_active_size = len(ranks)
                if max_world_size is not None:
                    assert max_world_size >= len(ranks), (
                        f"max_world_size ({max_world_size}) must be >= group size ({len(ranks)})"
                    )
                    pg_active_size = max_world_size

                pg_active_ranks = torch.zeros(pg_active_size, dtype=torch.int32, device=self.device)
                pg_active_ranks[: len(ranks)] = 1
                pg_active_ranks_cpu = torch.zeros(pg_active_size, dtype=torch.int32)
                pg_active_ranks_cpu[: len(ranks)] = 1

                if max_world_size is not None:
                    dev_opts = MooncakeBackendOptions(
                        pg_active_ranks, recovered_rank, max_world_size
                    )
                    cpu_opts = MooncakeBackendOptions(
                        pg_active_ranks_cpu, recovered_rank, max_world_size
                    )
                else:
                    dev_opts = MooncakeBackendOptions(pg_active_ranks, recovered_rank)
                    cpu_opts = MooncakeBackendOptions(pg_active_ranks_cpu, recovered_rank)

                active_ranks = pg_active_ranks[: len(ranks)]
                active_ranks_cpu = pg_active_ranks_cpu[: len(ranks)]
                device_group = dist.new_group(
                    ranks,
                    backend=_device_backend(self.device),
                    pg_options=dev_opts,
                    timeout=subgroup_timeout,
                    group_desc=f"{group_name}:device",
                    use_local_synchronization=use_local_synchronization,
                )
                cpu_group = dist.new_group(
                    ranks,
                    backend="mooncake-cpu",
                    pg_options=cpu_opts,
                    timeout=subgroup_timeout,
                    group_desc=f"{group_name}:cpu",
                    use_local_synchronization=use_local_synchronization,
                )
            else:
                raise NotImplementedError("the stand-in creates Mooncake groups only")
            if self.rank in ranks:
                self.ranks = ranks
                self.world_size = len(ranks)
                self.rank_in_group = ranks.index(self.rank)
                self.device_group = device_group
                self.cpu_group = cpu_group
                self.active_ranks = active_ranks
                self.active_ranks_cpu = active_ranks_cpu
        assert self.cpu_group is not None, f"rank {self.rank} is in none of {group_ranks}"
        assert self.device_group is not None

    @property
    def first_rank(self) -> int:
        return self.ranks[0]

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        objs: list[Any] = [None] * self.world_size
        dist.all_gather_object(objs, obj, group=self.cpu_group)
        return objs


def init_distributed_environment(
    world_size: int,
    rank: int,
    distributed_init_method: str,
    local_rank: int,
    backend: str = "mooncake",
    timeout: Optional[timedelta] = None,
    recovered_rank: bool = False,
    max_world_size: Optional[int] = None,
) -> None:
    """WORLD as SGLang creates it (Block 2 of the excerpt; ``"mooncake-cpu"`` keeps its active
    ranks on the CPU), then the world coordinator."""
    global _WORLD
    if backend in ("mooncake", "mooncake-cpu"):
        from mooncake.pg import MooncakeBackendOptions

        device = "cuda" if backend == "mooncake" else "cpu"
        use_max_ws = max_world_size and max_world_size > world_size
        ar_size = max_world_size if use_max_ws else world_size
        active_ranks = torch.zeros(ar_size, dtype=torch.int32, device=device)
        active_ranks[:world_size] = 1
        if use_max_ws:
            pg_options = MooncakeBackendOptions(active_ranks, recovered_rank, max_world_size)
        else:
            pg_options = MooncakeBackendOptions(active_ranks, recovered_rank)
    else:
        raise NotImplementedError("the stand-in creates Mooncake groups only")

    # this backend is used for WORLD
    dist.init_process_group(
        backend=backend,
        init_method=distributed_init_method,
        world_size=world_size,
        rank=rank,
        timeout=timeout,
        pg_options=pg_options,
    )
    _WORLD = GroupCoordinator(
        [list(range(world_size))],
        local_rank,
        backend,
        "world",
        torch.device(device),
        recovered_rank=recovered_rank,
        max_world_size=max_world_size,
    )


def initialize_model_parallel(
    tensor_model_parallel_size: int,
    backend: str = "mooncake",
    recovered_rank: bool = False,
    max_world_size: Optional[int] = None,
) -> None:
    """The TP group (one group of ``tensor_model_parallel_size`` ranks; EP = TP, as SGLang runs
    Mooncake EP)."""
    global _TP
    assert _WORLD is not None, "init_distributed_environment first"
    world = dist.get_world_size()
    assert world % tensor_model_parallel_size == 0
    groups = [
        list(range(i, i + tensor_model_parallel_size))
        for i in range(0, world, tensor_model_parallel_size)
    ]
    _TP = GroupCoordinator(
        groups,
        _WORLD.local_rank,
        backend,
        "tp",
        _WORLD.device,
        recovered_rank=recovered_rank,
        max_world_size=max_world_size,
    )


def get_world_group() -> GroupCoordinator:
    assert _WORLD is not None, "world group is not initialized"
    return _WORLD


def get_tp_group() -> GroupCoordinator:
    assert _TP is not None, "tensor model parallel group is not initialized"
    return _TP
