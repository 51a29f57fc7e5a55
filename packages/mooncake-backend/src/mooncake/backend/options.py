"""Backend options: constructor arguments first, ``MOONCAKE_*`` environment variables second.

Each option as: argument / environment variable / default.

- op timeout: ``timeout`` / ``MOONCAKE_OP_TIMEOUT_S`` / ``init_process_group(timeout=)``
- heartbeat interval: ``heartbeat_interval`` / ``MOONCAKE_HEARTBEAT_INTERVAL_MS`` / 100 ms
- heartbeat timeout: ``heartbeat_timeout`` / ``MOONCAKE_HEARTBEAT_TIMEOUT_MS`` / 3000 ms
  (engine default)
- raise on failure: ``raise_on_failure`` / ``MOONCAKE_RAISE_ON_FAILURE`` / off
- host / interface IP: ``host`` / ``MOONCAKE_HOST`` / 127.0.0.1 (or MASTER_ADDR's interface)
- join timeout: ``join_timeout`` / ``MOONCAKE_JOIN_TIMEOUT_S`` / 60 s
- CUDA data path: ``cuda_path`` / ``MOONCAKE_BACKEND_CUDA_PATH`` / ``staged`` (``auto``: same-host
  CUDA IPC when every member can, else staged; ``direct`` or ``staged`` force one)
"""

from __future__ import annotations

import operator
import os
from datetime import timedelta
from typing import Optional, Union

import torch

from mooncake.transfer import DEFAULT_HEARTBEAT_TIMEOUT


def _env_float(name: str, scale: float = 1.0) -> Optional[float]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw) * scale
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


def _env_bool(name: str) -> Optional[bool]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    return raw.strip().lower() in ("1", "true", "yes", "on")


class MooncakeBackendOptions:
    """Options passed as ``pg_options`` to ``init_process_group`` / ``new_group``.

    Args:
        active_ranks: int32 tensor ``[world_size]`` or longer (e.g. ``[max_world_size]``, slots
            beyond the group written 0 until ranks join): 1 = active, 0 = failed. On CPU for
            ``"mooncake-cpu"``, on CUDA for ``"mooncake"``. The backend writes the membership
            into it, in place, whenever it changes (views of it stay valid). ``None``: an
            internal tensor is used (``pg.get_active_ranks(group)`` reads it).
        is_extension: this process replaces a failed rank or grows the group: it starts in
            local-only mode and becomes a member once the survivors call ``recover_ranks`` /
            ``extend_group_size_to``. (A rank started *without* it, with ``world_size`` larger
            than the running group and a rank beyond it, is detected through the store and joins
            as a new member: its first op waits for the admission.)
        max_world_size: reserve group slots beyond ``world_size`` for later growth; the group then
            never grows past it. Without it the group grows as far as ``extend_group_size_to``
            asks. Positional (third) as in the reference: ``MooncakeBackendOptions(active_ranks,
            is_extension, max_world_size)``.
        timeout: per-op deadline in seconds (or a ``timedelta``); default: the group's timeout.
        raise_on_failure: raise ``RankFailureError`` instead of completing among survivors.
        heartbeat_interval, heartbeat_timeout: failure-detector settings in seconds.
        host: the address this rank's transfer engine listens on.
        join_timeout: seconds ``join_group`` waits before raising, and how long the first op
            after ``extend_group_size_to`` waits for the new ranks (then they count as failed).
        cuda_path: ``"auto"``, ``"direct"`` or ``"staged"`` (default): how the ``"mooncake"``
            backend moves CUDA tensors (``backend/cuda_direct.py``). ``auto`` maps same-host
            peers' device buffers through CUDA IPC when every member can, else stages through
            host memory; ``direct`` raises when the group cannot; ``staged`` always stages.
    """

    def __init__(
        self,
        active_ranks: Optional[torch.Tensor] = None,
        is_extension: bool = False,
        max_world_size: Optional[int] = None,
        *,
        timeout: Union[float, timedelta, None] = None,
        raise_on_failure: Optional[bool] = None,
        heartbeat_interval: Optional[float] = None,
        heartbeat_timeout: Optional[float] = None,
        host: Optional[str] = None,
        join_timeout: Optional[float] = None,
        cuda_path: Optional[str] = None,
    ) -> None:
        if active_ranks is not None:
            if not isinstance(active_ranks, torch.Tensor):
                raise TypeError(
                    f"active_ranks must be a torch.Tensor, got {type(active_ranks).__name__}"
                )
            if active_ranks.dtype != torch.int32 or active_ranks.dim() != 1:
                raise ValueError(
                    "active_ranks must be a 1-D int32 tensor, got "
                    f"dtype={active_ranks.dtype} shape={tuple(active_ranks.shape)}"
                )
        if max_world_size is not None:
            try:
                if isinstance(max_world_size, bool):
                    raise TypeError
                max_world_size = operator.index(max_world_size)  # numpy / tensor ints too
            except TypeError:
                raise TypeError(
                    f"max_world_size must be an int, got {max_world_size!r} "
                    f"({type(max_world_size).__name__})"
                ) from None
            if max_world_size < 1:
                raise ValueError(f"max_world_size must be >= 1, got {max_world_size}")
        if isinstance(timeout, timedelta):
            timeout = timeout.total_seconds()
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.active_ranks = active_ranks
        self.is_extension = bool(is_extension)
        self.max_world_size = None if max_world_size is None else int(max_world_size)
        self.timeout = timeout if timeout is not None else _env_float("MOONCAKE_OP_TIMEOUT_S")
        rof = (
            raise_on_failure
            if raise_on_failure is not None
            else _env_bool("MOONCAKE_RAISE_ON_FAILURE")
        )
        self.raise_on_failure = bool(rof)
        self.heartbeat_interval = (
            heartbeat_interval
            if heartbeat_interval is not None
            else _env_float("MOONCAKE_HEARTBEAT_INTERVAL_MS", 1e-3)
        )
        hb_timeout = (
            heartbeat_timeout
            if heartbeat_timeout is not None
            else _env_float("MOONCAKE_HEARTBEAT_TIMEOUT_MS", 1e-3)
        )
        # The engine's default, 3 s: a killed process is detected at once through its
        # connections either way; the heartbeat only catches hung or unreachable ranks, and a
        # short timeout turns a starved-but-alive rank (seen at load average > 8 with 1 s) into
        # a false failure.
        self.heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT if hb_timeout is None else hb_timeout
        self.host = host or os.environ.get("MOONCAKE_HOST")
        jt = join_timeout if join_timeout is not None else _env_float("MOONCAKE_JOIN_TIMEOUT_S")
        self.join_timeout = 60.0 if jt is None else jt
        from .cuda_direct import resolve_mode

        self.cuda_path = resolve_mode(cuda_path)

    def __repr__(self) -> str:
        return (
            f"MooncakeBackendOptions(is_extension={self.is_extension}, "
            f"max_world_size={self.max_world_size}, timeout={self.timeout}, "
            f"raise_on_failure={self.raise_on_failure})"
        )
