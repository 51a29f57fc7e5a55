"""Stand-in for ``sglang.srt.distributed.utils``: ``get_global_tcp_store``."""

from __future__ import annotations

from typing import Any, Optional

_store: Optional[Any] = None


def set_global_tcp_store(store: Any) -> None:
    global _store
    _store = store


def get_global_tcp_store() -> Optional[Any]:
    return _store
