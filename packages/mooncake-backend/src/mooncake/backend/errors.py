"""Exception types of the Mooncake backend."""

from __future__ import annotations


class MooncakeBackendError(RuntimeError):
    """Base class for membership and transport failures raised by the backend."""


class RankFailureError(MooncakeBackendError):
    """Raised instead of completing among survivors when ``raise_on_failure`` is set.

    ``failed_ranks`` lists the group ranks that were excluded by the op that raised.
    """

    def __init__(self, message: str, failed_ranks: list[int]) -> None:
        super().__init__(message)
        self.failed_ranks = failed_ranks


class EvictedError(MooncakeBackendError):
    """This rank is out of the group: the survivors excluded it (it missed an op's deadline), or
    it could not reach a majority of the group's last membership with every silent peer unproven
    dead (it may be the minority side of a partition). Raised by that op and by every later op of
    the group, which never writes a result; ``mooncake.pg.rejoin`` brings the rank back."""


class OpMismatchError(ValueError):
    """Ranks issued different collectives, shapes, dtypes or reduce ops for the same op."""


class JoinTimeoutError(MooncakeBackendError, TimeoutError):
    """A joiner was not admitted (or a peer did not become ready) before the deadline."""
