"""mooncake.transfer: one-sided WRITE/READ between processes, notifications, and a failure detector.

Torch-free and GPU-optional. Transports are chosen per peer segment: shared memory (memfd) or
cross-memory attach on one host, TCP across hosts. See README.md for the contract.
"""

from __future__ import annotations

from pathlib import Path

from ._engine import copy as copy_buffers
from ._engine import rdma_status
from ._engine import reduce as reduce_buffers
from .engine import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    Notification,
    RemoteSegment,
    Segment,
    TransferEngine,
    TransferHandle,
)
from .enums import PeerState, RoundStatus, TransferStatus
from .errors import PeerDeadError, TransferError, TransferTimeout

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "Notification",
    "PeerDeadError",
    "PeerState",
    "RemoteSegment",
    "RoundStatus",
    "Segment",
    "TransferEngine",
    "TransferError",
    "TransferHandle",
    "TransferStatus",
    "TransferTimeout",
    "__version__",
    "copy_buffers",
    "get_include",
    "rdma_status",
    "reduce_buffers",
]


def get_include() -> str:
    """Directory of the C/C++/CUDA headers (mooncake/transfer/..., mooncake/device/...):
    the copy installed in the wheel, or the source tree's include/ for an in-tree checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "include"
    if installed.is_dir():
        return str(installed)
    source = here.parents[2] / "include"
    if source.is_dir():
        return str(source)
    return str(installed)
