"""Enumerations of mooncake.transfer."""

from __future__ import annotations

import enum

from ._engine import RoundStatus

__all__ = ["PeerState", "RoundStatus", "TransferStatus"]

# RoundStatus (defined natively, csrc/rounds.h, as an enum.IntEnum): the per-peer outcome of a
# message round (TransferEngine.recv_round / exchange_round). MESSAGE = 0 (a message that did not
# land, returned as a Notification), DEAD = 1 (the peer is DEAD with nothing queued; the reason is
# returned), TIMEOUT = 2, LANDED = 3 (exchange_round: the message equalled the expectation and its
# payload was copied), SEND_FAILED = 4 (exchange_round: this side's message could not be sent).


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
