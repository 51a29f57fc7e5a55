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
    "get_num_synced_ranks",
    "get_peer_state",
    "is_mooncake_group",
    "join_group",
    "op_timeout",
    "recover_ranks",
    "rejoin",
    "set_host_ip",
]


def _creator(device_type: str):
    def create(dist_opts, pg_options=None):
        timeout = dist_opts.timeout
        timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        if pg_options is not None and not isinstance(pg_options, MooncakeBackendOptions):
            raise TypeError(
                "pg_options must be mooncake.pg.MooncakeBackendOptions, "
                f"got {type(pg_options).__name__}"
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
    """Membership after the group's last op: int32 ``[world]`` (``[max_world_size]``, or the
    grown size), 1 = active.

    Returns a CPU copy; the tensor given in ``MooncakeBackendOptions`` is updated in place too.
    """
    pg = _resolve(group)
    return pg._active.host.clone()


def get_num_synced_ranks(group=None) -> int:
    """How many members of the group this rank is connected to, itself included (local, no
    communication). Equals the world size once every rank's connection is up; 1 for a joiner
    that has not been admitted yet."""
    return _resolve(group).num_synced_ranks()


def set_host_ip(host: str) -> None:
    """The address this process's transfer engine listens on (as ``MOONCAKE_HOST``); call it
    before the first Mooncake group is created. ``MooncakeBackendOptions(host=)`` wins over it."""
    import os

    from mooncake.backend import world

    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, got {host!r}")
    if world._world is not None and host != world._world.host:
        raise RuntimeError(
            f"set_host_ip({host!r}): the transfer engine already listens on "
            f"{world._world.host!r}; call it before init_process_group"
        )
    os.environ["MOONCAKE_HOST"] = host


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


def rejoin(group=None, timeout: Optional[float] = None) -> None:
    """Evicted side: come back into the group in this process, without restarting Python.

    After an op raised ``EvictedError`` (the survivors went on without this rank, or it could not
    reach a majority), this gives the process a new transfer-engine incarnation, re-enters every
    Mooncake group of the process as a joiner and blocks until the survivors admit this rank:
    they see it ready in ``get_peer_state`` and call ``recover_ranks``, and the op after that
    includes it again. ``JoinTimeoutError`` after ``timeout`` s (default
    ``MooncakeBackendOptions.join_timeout``); the rank then stays evicted and may call ``rejoin``
    again. ``ValueError`` if this rank was not evicted."""
    from mooncake.backend.recovery import rejoin as _rejoin

    pg = _resolve(group)
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    _rejoin(pg, pg._opts.join_timeout if timeout is None else float(timeout))


def extend_group_size_to(group, new_size: int, timeout: Optional[float] = None) -> None:
    """Collective among the active ranks: grow the group to ``new_size`` ranks. Non-blocking as
    in the reference: it returns without waiting for the new ranks; the group's next
    collective waits for them (up to ``timeout`` s, default
    ``MooncakeBackendOptions.join_timeout``, 60 s) and admits them at one agreed op, so that
    collective is a full-group op. New ranks start with ``world_size >= new_size`` and
    ``rank`` in ``[size, new_size)``, plainly or with ``is_extension=True``. A new rank still
    missing when the wait ends counts as failed (0 in ``active_ranks``; it may come back later
    as a replacement, see ``recover_ranks``). Afterwards ``dist.get_world_size()`` returns
    ``new_size``. The group grows without limit unless it was created with
    ``max_world_size``, which then caps ``new_size``."""
    from mooncake.backend.recovery import extend

    pg = _resolve(group)
    m = pg.membership
    if isinstance(new_size, bool) or not isinstance(new_size, int):
        raise TypeError(f"new_size must be an int, got {new_size!r}")
    if new_size < m.extent:
        raise ValueError(
            f"new_size={new_size} is smaller than the group's size {m.extent} (groups only grow)"
        )
    if not m.growable and new_size > m.capacity:
        raise ValueError(f"new_size={new_size} exceeds the group's max_world_size={m.capacity}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    if new_size == m.extent:
        return
    extend(pg, new_size, pg._opts.join_timeout if timeout is None else float(timeout))
