"""Mooncake EP's public entry point: ``from mooncake.mooncake_ep_buffer import Buffer``.

See ``mooncake.ep.buffer.Buffer`` for the API (shapes, dtypes, fault semantics).
"""

from mooncake.ep.buffer import Buffer
from mooncake.ep.event import EventOverlap

__all__ = ["Buffer", "EventOverlap"]
