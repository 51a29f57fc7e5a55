"""Exception types of mooncake.transfer (raised by the native core too)."""

from __future__ import annotations

from typing import Optional

__all__ = ["PeerDeadError", "TransferError", "TransferTimeout"]


class TransferError(RuntimeError):
    """A transfer, connection or notification failed.

    Attributes:
        peer: name of the peer engine involved, or None when not about one peer.
        reason: short cause (e.g. "connection lost (EOF)", "bad secret").
    """

    def __init__(self, message: str = "", peer: Optional[str] = None, reason: str = "") -> None:
        super().__init__(message)
        self.peer = peer
        self.reason = reason or message


class PeerDeadError(TransferError):
    """The peer is DEAD (connection lost, heartbeat timeout, process gone). Final for that name."""


class TransferTimeout(TransferError, TimeoutError):
    """The operation did not finish within its timeout (the peer may still be alive)."""
