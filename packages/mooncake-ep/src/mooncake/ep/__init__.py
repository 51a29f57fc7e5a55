"""Mooncake EP internals and extras (``mooncake.ep``).

Public API: ``mooncake.mooncake_ep_buffer.Buffer`` (also ``mooncake.ep.Buffer``) and
``mooncake.ep.deep_ep_compat`` (DeepEP drop-in). Modules: ``buffer`` (API and validation), ``path``
(path interface and selection), ``portable_path`` (torch over collectives), ``routing_plan`` (its
index arithmetic), ``fp8`` (the contract's FP8 cast), ``layout`` (fast path buffer layout),
``limits``, ``event``, ``membership`` (backend queries), ``faults`` (fault injection),
``reference`` (plain-torch reference), ``bench`` (``python -m mooncake.ep.bench``).
"""

from typing import Any

__all__ = ["Buffer", "EventOverlap"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``mooncake.ep.layout`` and friends import without pulling in the whole API.
    if name == "Buffer":
        from .buffer import Buffer

        return Buffer
    if name == "EventOverlap":
        from .event import EventOverlap

        return EventOverlap
    raise AttributeError(f"module 'mooncake.ep' has no attribute {name!r}")
