"""Stand-in for ``sglang.srt.layers.dp_attention``: ``get_is_extend_in_batch``."""

from __future__ import annotations

_is_extend_in_batch = False


def set_is_extend_in_batch(value: bool) -> None:
    global _is_extend_in_batch
    _is_extend_in_batch = value


def get_is_extend_in_batch() -> bool:
    return _is_extend_in_batch
