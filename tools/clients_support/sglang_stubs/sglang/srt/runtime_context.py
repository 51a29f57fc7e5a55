"""Stand-in for ``sglang.srt.runtime_context``: ``get_resources``, ``get_exec``, ``get_parallel``.

The driver fills the context with ``configure`` before it uses the SGLang files.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

_resources = SimpleNamespace(buffers={})
_exec = SimpleNamespace(
    moe=SimpleNamespace(
        elastic_ep_backend="mooncake",
        moe_a2a_backend="mooncake",
        is_ep_joiner=False,
        ep_join_mode="recover",
    )
)
_parallel = SimpleNamespace(
    max_ep_size=None, ep_join_rank_offset=0, tp_size=1, elastic_ep_initial_size=None
)


def configure(
    *,
    tp_size: int,
    max_ep_size: Optional[int] = None,
    is_ep_joiner: bool = False,
    **moe: Any,
) -> None:
    _parallel.tp_size = tp_size
    _parallel.max_ep_size = max_ep_size
    _exec.moe.is_ep_joiner = is_ep_joiner
    for key, value in moe.items():
        setattr(_exec.moe, key, value)


def get_resources() -> SimpleNamespace:
    return _resources


def get_exec() -> SimpleNamespace:
    return _exec


def get_parallel() -> SimpleNamespace:
    return _parallel
