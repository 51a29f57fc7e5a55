"""Internals of the Mooncake backend. The public API is ``mooncake.pg``."""

from .errors import (
    EvictedError,
    JoinTimeoutError,
    MooncakeBackendError,
    OpMismatchError,
    RankFailureError,
)
from .options import MooncakeBackendOptions

__all__ = [
    "EvictedError",
    "JoinTimeoutError",
    "MooncakeBackendError",
    "MooncakeBackendOptions",
    "OpMismatchError",
    "RankFailureError",
]
