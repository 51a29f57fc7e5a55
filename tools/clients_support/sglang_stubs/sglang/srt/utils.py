"""Stand-in for ``sglang.srt.utils``: ``get_int_env_var``, ``is_cpu``, ``is_cuda``."""

from __future__ import annotations

import os

import torch


def get_int_env_var(name: str, default: int = 0) -> int:
    value = os.getenv(name)
    if value is None or not value.strip():
        return default
    return int(value)


def is_cpu() -> bool:
    """SGLang's CPU engine is selected with ``SGLANG_USE_CPU_ENGINE`` (the driver's ``--device
    cpu`` sets it)."""
    return os.getenv("SGLANG_USE_CPU_ENGINE", "false").lower() in ("1", "true")


def is_cuda() -> bool:
    return not is_cpu() and torch.cuda.is_available() and torch.version.cuda is not None
