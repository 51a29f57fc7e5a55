"""Limits of the EP API and the checks that enforce them.

Every check raises before anything is sent: ``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong value, shape, device or layout; the message names the argument, its value and the limit.

| limit | value | why |
| --- | --- | --- |
| hidden ``H`` | any multiple of 128 | FP8 scales cover 128 channels |
| top-k ``K`` | 1 .. 16 | combine slots per token in the fast path's buffer |
| tokens per rank ``T`` | 1 .. 1024 | slots per (expert, source) in the fast path's buffer |
| ranks ``R`` | any >= 1 | |
| experts ``E`` | a multiple of ``R`` (>= ``R``) | every rank owns ``E / R`` experts |
"""

from __future__ import annotations

from typing import Any, Optional

import torch

MAX_TOPK = 16
MAX_TOKENS_PER_RANK = 1024
HIDDEN_ALIGNMENT = 128


def check_int(name: str, value: Any) -> int:
    """``value`` must be a Python int (not a bool); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_hidden(hidden: Any, name: str = "hidden") -> int:
    check_int(name, hidden)
    if hidden <= 0 or hidden % HIDDEN_ALIGNMENT != 0:
        raise ValueError(
            f"{name}={hidden} is not supported: it must be a positive multiple of "
            f"{HIDDEN_ALIGNMENT}"
        )
    return hidden


def check_tokens_per_rank(value: Any, name: str = "num_max_dispatch_tokens_per_rank") -> int:
    check_int(name, value)
    if not 1 <= value <= MAX_TOKENS_PER_RANK:
        raise ValueError(
            f"{name}={value} is out of range: the limit is 1 <= {name} <= {MAX_TOKENS_PER_RANK}"
        )
    return value


def check_topk(value: int, name: str = "topk_idx.shape[1]") -> int:
    if not 1 <= value <= MAX_TOPK:
        raise ValueError(f"{name}={value} is out of range: top-k must be 1 <= K <= {MAX_TOPK}")
    return value


def check_ranks(value: Any, name: str = "num_ranks") -> int:
    check_int(name, value)
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    return value


def check_experts(num_experts: Any, num_ranks: int, name: str = "num_experts") -> int:
    check_int(name, num_experts)
    if num_experts < num_ranks or num_experts % num_ranks != 0:
        raise ValueError(
            f"{name}={num_experts} must be a positive multiple of the number of ranks "
            f"({num_ranks}): "
            f"every rank owns num_experts / num_ranks experts"
        )
    return num_experts


def check_shape_limits(tokens_per_rank: Any, hidden: Any, num_ranks: Any, num_experts: Any) -> None:
    """The limits that size the buffers: ``T``, ``H``, ``R``, ``E``."""
    check_tokens_per_rank(tokens_per_rank)
    check_hidden(hidden)
    check_ranks(num_ranks)
    check_experts(num_experts, num_ranks)


def check_timeout_us(value: Any, name: str = "timeout_us") -> int:
    check_int(name, value)
    if value < -1:
        raise ValueError(
            f"{name}={value} is invalid: use -1 (wait forever) or a duration >= 0 in microseconds"
        )
    return value


def check_tensor(
    name: str,
    value: Any,
    dtype: torch.dtype,
    shape: Optional[tuple[Optional[int], ...]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """``value`` must be a tensor of ``dtype`` (TypeError) with ``shape`` (None entries are free),
    on ``device`` and contiguous (ValueError)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if shape is not None:
        ok = value.dim() == len(shape) and all(
            want is None or got == want for got, want in zip(value.shape, shape)
        )
        if not ok:
            want_text = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want_text}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but must be on {device} (the device of x)")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(value.stride())})")
    return value


def check_topk_values(topk_idx_cpu: torch.Tensor, num_experts: int, name: str = "topk_idx") -> None:
    """Entries in ``[-1, num_experts)``, no expert twice in a row (needs the values on the host)."""
    if topk_idx_cpu.numel() == 0:
        return
    low, high = int(topk_idx_cpu.min()), int(topk_idx_cpu.max())
    if low < -1 or high >= num_experts:
        bad = low if low < -1 else high
        raise ValueError(
            f"{name} has entry {bad}: entries must be -1 (no expert) or in [0, "
            f"num_experts={num_experts})"
        )
    if topk_idx_cpu.shape[1] > 1:
        ordered = topk_idx_cpu.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            row = int(repeated.any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"{name} row {row} lists an expert twice ({topk_idx_cpu[row].tolist()}): "
                f"each token may select an expert at most once"
            )
