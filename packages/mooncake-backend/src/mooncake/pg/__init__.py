"""Mooncake Backend: a fault-tolerant ``torch.distributed`` backend.

``import mooncake.pg`` registers two backends:

* ``"mooncake-cpu"``: CPU tensors;
* ``"mooncake"``: CUDA tensors (staged through host memory).

Collectives complete among the survivors when ranks die; the membership after every op is written
into ``MooncakeBackendOptions.active_ranks`` (or read with ``get_active_ranks``). Replacements
join with ``is_extension=True`` and are admitted by ``recover_ranks``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from mooncake.backend.errors import (
    EvictedError,
    JoinTimeoutError,
    MooncakeBackendError,
    OpMismatchError,
    RankFailureError,
)
from mooncake.backend.options import MooncakeBackendOptions
from mooncake.backend.process_group import MooncakeProcessGroup

__version__ = "0.1.0"
__all__ = [
    "EvictedError",
    "JoinTimeoutError",
    "MooncakeBackendError",
    "MooncakeBackendOptions",
    "MooncakeProcessGroup",
    "OpMismatchError",
    "RankFailureError",
    "extend_group_size_to",
    "get_active_ranks",
    "get_peer_state",
    "is_mooncake_group",
    "join_group",
    "op_timeout",
    "recover_ranks",
]


def _creator(device_type: str):
    def create(dist_opts, pg_options=None):
        timeout = dist_opts.timeout
        timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        if pg_options is not None and not isinstance(pg_options, MooncakeBackendOptions):
            raise TypeError(
                f"pg_options must be mooncake.pg.MooncakeBackendOptions, got {type(pg_options).__name__}"
            )
        return MooncakeProcessGroup(
            dist_opts.store,
            dist_opts.group_rank,
            dist_opts.group_size,
            list(dist_opts.global_ranks_in_group),
            str(dist_opts.group_id),
            timeout_s,
            pg_options,
            device_type,
        )

    return create


def _register() -> None:
    backends = getattr(dist.Backend, "backend_list", [])
    if "mooncake-cpu" not in backends:
        dist.Backend.register_backend(
            "mooncake-cpu", _creator("cpu"), extended_api=True, devices=["cpu"]
        )
    if "mooncake" not in backends:
        dist.Backend.register_backend(
            "mooncake", _creator("cuda"), extended_api=True, devices=["cuda"]
        )


_register()


def _resolve(group) -> MooncakeProcessGroup:
    if group is None:
        group = dist.group.WORLD
    if isinstance(group, MooncakeProcessGroup):
        return group
    if isinstance(group, dist.ProcessGroup):
        for dev in ("cpu", "cuda"):
            try:
                be = group._get_backend(torch.device(dev))
            except Exception:
                continue
            if isinstance(be, MooncakeProcessGroup):
                return be
    raise TypeError(
        f"expected a mooncake process group (or its backend), got {type(group).__name__}"
    )


def is_mooncake_group(group) -> bool:
    """True when ``group`` (or its backend) is a Mooncake process group."""
    try:
        _resolve(group)
        return True
    except TypeError:
        return False


def get_active_ranks(group=None) -> torch.Tensor:
    """Membership after the group's last op: int32 ``[world]`` (``[max_world_size]``), 1 = active.

    Returns a CPU copy; the tensor given in ``MooncakeBackendOptions`` is updated in place too.
    """
    pg = _resolve(group)
    return pg.active_ranks.detach().to("cpu", copy=True)


@contextlib.contextmanager
def op_timeout(group, seconds: Optional[float]) -> Iterator[None]:
    """Ops issued by this thread inside the block use ``seconds`` as their deadline
    (``None`` or <= 0: the group's default)."""
    pg = _resolve(group)
    with pg.op_timeout(seconds):
        yield


def get_peer_state(group, ranks: Sequence[int]) -> list[bool]:
    """Collective among the active ranks: for each rank in ``ranks``, True once a replacement
    (or a new rank) is reachable and ready to be admitted. Every survivor's n-th call returns the
    same answer."""
    from mooncake.backend.recovery import peer_state

    return peer_state(_resolve(group), ranks)


def recover_ranks(group, ranks: Sequence[int], timeout: Optional[float] = None) -> None:
    """Collective among the active ranks: admit the replacements of ``ranks``; the next op
    includes them. Waits (agreed among survivors) up to ``timeout`` s for them to be ready."""
    from mooncake.backend.recovery import recover

    pg = _resolve(group)
    recover(pg, ranks, pg.membership.extent, pg._opts.join_timeout if timeout is None else timeout)


def join_group(group=None, timeout: Optional[float] = None) -> None:
    """Joiner side: block until the survivors admitted this process (``JoinTimeoutError`` after
    ``timeout`` s, default ``MooncakeBackendOptions.join_timeout``)."""
    pg = _resolve(group)
    pg.membership.wait_admission(pg._opts.join_timeout if timeout is None else timeout)


def extend_group_size_to(group, new_size: int, timeout: Optional[float] = None) -> None:
    """Collective among the active ranks: grow the group to ``new_size`` ranks (at most
    ``max_world_size``), admitting ranks ``[size, new_size)`` once they started with
    ``is_extension=True``. Afterwards ``dist.get_world_size()`` returns ``new_size``."""
    from mooncake.backend.recovery import recover

    pg = _resolve(group)
    cap = pg.membership.capacity
    if not pg.size() <= new_size <= cap:
        raise ValueError(f"new_size={new_size} must be in [{pg.size()}, max_world_size={cap}]")
    if new_size == pg.size():
        return
    recover(
        pg,
        range(pg.size(), new_size),
        new_size,
        pg._opts.join_timeout if timeout is None else timeout,
    )
