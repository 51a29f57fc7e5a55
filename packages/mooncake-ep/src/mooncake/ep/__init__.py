"""Mooncake EP internals and extras (``mooncake.ep``).

Public API: ``mooncake.mooncake_ep_buffer.Buffer`` (also ``mooncake.ep.Buffer``) and
``mooncake.ep.deep_ep_compat`` (DeepEP drop-in). Modules: ``buffer`` (API), ``validation`` (its
argument checks), ``path`` (path interface and selection), ``portable_path`` (torch over
collectives), ``routing_plan`` (its index arithmetic), ``fp8`` (the contract's FP8 cast),
``layout`` (fast path buffer layout), ``limits``, ``event``, ``membership`` (backend queries),
``faults`` (fault injection), ``reference`` (plain-torch reference), ``bench``
(``python -m mooncake.ep.bench``).

As the classic ``mooncake.ep`` module did, this one also serves every public name of
``mooncake.pg`` (``get_active_ranks``, ``get_peer_state``, ``recover_ranks``, ``join_group``,
``extend_group_size_to``, ``MooncakeBackendOptions``, ...), imported on first use: ``from mooncake
import ep; ep.get_active_ranks(group)`` works, and ``import mooncake.ep`` alone does not load the
backend.
"""

import os
from typing import Any

__all__ = ["Buffer", "EventOverlap"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _is_submodule(name: str) -> bool:
    return os.path.exists(os.path.join(_HERE, name + ".py")) or os.path.isdir(
        os.path.join(_HERE, name)
    )


def __getattr__(name: str) -> Any:
    # Lazy, so that ``mooncake.ep.layout`` and friends import without pulling in the whole API.
    if name == "Buffer":
        from .buffer import Buffer

        return Buffer
    if name == "EventOverlap":
        from .event import EventOverlap

        return EventOverlap
    # The import system asks for a submodule here before importing it (``from mooncake.ep import
    # fast_path``): answer that it is not an attribute yet without loading the backend.
    if not name.startswith("_") and not _is_submodule(name):
        try:
            import mooncake.pg as pg
        except ImportError as exc:
            raise AttributeError(
                f"module 'mooncake.ep' has no attribute {name!r} (it would come from mooncake.pg, "
                f"which cannot be imported: {exc})"
            ) from exc
        value = getattr(pg, name, None)
        if name in getattr(pg, "__all__", ()) or str(getattr(value, "__module__", "")).startswith(
            "mooncake."
        ):  # its public API, not what it imported (torch, typing, ...)
            return value
    raise AttributeError(f"module 'mooncake.ep' has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals()) | set(__all__)
    try:
        import mooncake.pg as pg

        names |= set(getattr(pg, "__all__", ()))
    except ImportError:
        pass
    return sorted(names)
