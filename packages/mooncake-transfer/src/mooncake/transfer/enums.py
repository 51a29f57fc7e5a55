"""Enumerations of mooncake.transfer."""

from __future__ import annotations

import enum

__all__ = ["PeerState", "TransferStatus"]


class PeerState(enum.IntEnum):
    """Failure-detector view of a peer. DEAD is final for that peer name."""

    UNKNOWN = 0
    ALIVE = 1
    SUSPECT = 2
    DEAD = 3


class TransferStatus(enum.IntEnum):
    """Outcome of a TransferHandle wait/poll."""

    PENDING = 0
    DONE = 1
    FAILED = 2
    TIMEOUT = 3
