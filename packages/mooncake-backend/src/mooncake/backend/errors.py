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
    """This rank was excluded by the survivors (it missed an op's deadline) and may not continue."""


class OpMismatchError(ValueError):
    """Ranks issued different collectives, shapes, dtypes or reduce ops for the same op."""


class JoinTimeoutError(MooncakeBackendError, TimeoutError):
    """A joiner was not admitted (or a peer did not become ready) before the deadline."""
