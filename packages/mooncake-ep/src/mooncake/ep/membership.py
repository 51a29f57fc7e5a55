"""What EP asks the group's backend about membership, and nothing else.

The backend is the source of truth for which ranks are alive. With the Mooncake backend
(``mooncake.pg``) collectives complete among the survivors, a failed rank's slots in all-to-all
outputs are zero-filled, ``pg.op_timeout(group, seconds)`` bounds the ops issued inside it, and
``pg.get_active_ranks(group)`` says who is still a member after the last op. Other backends (gloo,
NCCL) have no fault tolerance: deadlines are not enforced by them and a dead peer makes their
collectives raise or hang, which EP cannot repair.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("mooncake.ep")

MOONCAKE_BACKEND_NAMES = ("mooncake", "mooncake-cpu")


def _import_pg() -> Optional[Any]:
    try:
        import mooncake.pg as pg
    except ImportError:
        return None
    return pg


def backend_name(group: Any) -> str:
    """``dist.get_backend(group)`` as a lower-case string, or ``"unknown"``."""
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:
        return "unknown"


def is_mooncake_group(group: Any) -> bool:
    """True when ``group`` runs on the Mooncake backend (fault tolerant)."""
    pg = _import_pg()
    if pg is None:
        return False
    check = getattr(pg, "is_mooncake_group", None)
    if check is not None:
        try:
            return bool(check(group))
        except Exception:
            pass
    name = backend_name(group)
    return any(part.split(":")[-1] in MOONCAKE_BACKEND_NAMES for part in name.split(","))


def collective_devices(group: Any) -> set[str]:
    """Device types this group's collectives accept: ``{"cpu"}``, ``{"cuda"}`` or both."""
    name = backend_name(group)
    devices: set[str] = set()
    for part in name.split(","):
        device, _, backend = part.rpartition(":")
        if device:
            devices.add(device)
        elif backend in ("gloo", "mooncake-cpu"):
            devices.add("cpu")
        elif backend in ("nccl", "mooncake", "xccl"):
            devices.add("cuda")
    if not devices:  # unknown backend: probe torch's per-device backends
        for device in ("cpu", "cuda"):
            try:
                group._get_backend(torch.device(device))
                devices.add(device)
            except Exception:
                pass
    return devices or {"cpu"}


class BackendMembership:
    """Deadlines and failure reports for one group (no-ops on non fault-tolerant backends)."""

    def __init__(self, group: Any, num_ranks: int) -> None:
        self.group = group
        self.num_ranks = num_ranks
        self._pg = _import_pg()
        self.fault_tolerant = self._pg is not None and is_mooncake_group(group)

    def deadline(self, seconds: Optional[float]) -> AbstractContextManager[Any]:
        """Context bounding the ops issued inside it by ``seconds`` (None: backend default)."""
        if not self.fault_tolerant or seconds is None:
            return contextlib.nullcontext()
        return self._pg.op_timeout(self.group, seconds)

    def alive(self) -> Optional[list[bool]]:
        """Per-rank membership after the last op, or None when the backend does not report it."""
        if not self.fault_tolerant:
            return None
        active = self._pg.get_active_ranks(self.group)
        return [bool(v) for v in active.reshape(-1)[: self.num_ranks].tolist()]
