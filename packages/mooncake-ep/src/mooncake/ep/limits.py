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

from enum import IntEnum
from typing import Any, Optional, TypeVar

import torch

MAX_TOPK = 16
MAX_TOKENS_PER_RANK = 1024
MAX_TIMEOUT_US = (1 << 63) - 1  # the kernels' int64
HIDDEN_ALIGNMENT = 128


class Limit(IntEnum):
    """Which limit a rejected argument violated: the code the portable path sends to its peers in
    the count exchange, so that every rank raises (``PeerArgumentError``) before anything is
    sent."""

    ARGUMENT = 1  # type, dtype, shape, device, layout of an argument
    HIDDEN = 2
    TOPK = 3
    TOKENS_PER_RANK = 4
    TOKENS = 5  # N <= T
    EXPERTS = 6
    EXPERT_ID = 7
    EXPERT_TWICE = 8
    TIMEOUT = 9
    FLAGS = 10  # round_scale / use_ue8m0 / async_finish + return_recv_hook combinations


LIMIT_TEXT = {
    Limit.ARGUMENT: "argument type, dtype, shape, device or layout",
    Limit.HIDDEN: f"hidden H a positive multiple of {HIDDEN_ALIGNMENT}",
    Limit.TOPK: f"top-k 1 <= K <= {MAX_TOPK}",
    Limit.TOKENS_PER_RANK: f"1 <= num_max_dispatch_tokens_per_rank <= {MAX_TOKENS_PER_RANK}",
    Limit.TOKENS: "N <= T (tokens on a rank <= num_max_dispatch_tokens_per_rank)",
    Limit.EXPERTS: "num_experts a positive multiple of the number of ranks",
    Limit.EXPERT_ID: "expert ids -1 or in [0, num_experts)",
    Limit.EXPERT_TWICE: "each token selects an expert at most once",
    Limit.TIMEOUT: f"timeout_us -1 or 0 <= timeout_us <= {MAX_TIMEOUT_US}",
    Limit.FLAGS: "flag combination (round_scale needs use_fp8, use_ue8m0 needs round_scale, "
    "async_finish excludes return_recv_hook)",
}

_E = TypeVar("_E", bound=BaseException)


def tag_limit(exc: _E, limit: Limit, value: Any = None) -> _E:
    """Mark ``exc`` with the limit it reports (and the offending value, an int, if there is one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        value = None
    exc.ep_limit = limit  # type: ignore[attr-defined]
    exc.ep_value = value  # type: ignore[attr-defined]
    return exc


def limit_of(exc: BaseException) -> tuple[Limit, Optional[int]]:
    """The limit ``exc`` reports (``Limit.ARGUMENT`` when it was not tagged) and its value."""
    return getattr(exc, "ep_limit", Limit.ARGUMENT), getattr(exc, "ep_value", None)


class PeerArgumentError(ValueError):
    """Raised on every rank whose own arguments were fine when another rank's violated a limit (the
    portable path learns it in the op's first exchange; nothing is sent). Attributes: ``ranks``
    (the offending ranks), ``rank``, ``limit`` (``Limit``), ``value`` (int or None), ``op``."""

    def __init__(self, op: str, ranks: list[int], limit: Limit, value: Optional[int]) -> None:
        self.op, self.ranks, self.rank, self.limit, self.value = op, ranks, ranks[0], limit, value
        shown = "" if value is None else f" (value {value})"
        super().__init__(
            f"rank {ranks[0]} rejected its {op} arguments: the limit {LIMIT_TEXT[limit]} is "
            f"violated{shown}"
            + (f"; ranks {ranks} rejected theirs" if len(ranks) > 1 else "")
            + f". Every rank raises before anything is sent; rank {ranks[0]} raised the detailed "
            "error"
        )


def check_int(name: str, value: Any, limit: Limit = Limit.ARGUMENT) -> int:
    """``value`` must be a Python int (not a bool); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise tag_limit(
            TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}"), limit
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise tag_limit(
            TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}"), Limit.FLAGS
        )
    return value


def check_hidden(hidden: Any, name: str = "hidden") -> int:
    check_int(name, hidden, Limit.HIDDEN)
    if hidden <= 0 or hidden % HIDDEN_ALIGNMENT != 0:
        raise tag_limit(
            ValueError(
                f"{name}={hidden} is not supported: it must be a positive multiple of "
                f"{HIDDEN_ALIGNMENT}"
            ),
            Limit.HIDDEN,
            hidden,
        )
    return hidden


def check_tokens_per_rank(value: Any, name: str = "num_max_dispatch_tokens_per_rank") -> int:
    check_int(name, value, Limit.TOKENS_PER_RANK)
    if not 1 <= value <= MAX_TOKENS_PER_RANK:
        raise tag_limit(
            ValueError(
                f"{name}={value} is out of range: the limit is 1 <= {name} <= {MAX_TOKENS_PER_RANK}"
            ),
            Limit.TOKENS_PER_RANK,
            value,
        )
    return value


def check_topk(value: int, name: str = "topk_idx.shape[1]") -> int:
    if not 1 <= value <= MAX_TOPK:
        raise tag_limit(
            ValueError(f"{name}={value} is out of range: top-k must be 1 <= K <= {MAX_TOPK}"),
            Limit.TOPK,
            value,
        )
    return value


def check_ranks(value: Any, name: str = "num_ranks") -> int:
    check_int(name, value)
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    return value


def check_experts(num_experts: Any, num_ranks: int, name: str = "num_experts") -> int:
    check_int(name, num_experts, Limit.EXPERTS)
    if num_experts < num_ranks or num_experts % num_ranks != 0:
        raise tag_limit(
            ValueError(
                f"{name}={num_experts} must be a positive multiple of the number of ranks "
                f"({num_ranks}): every rank owns num_experts / num_ranks experts"
            ),
            Limit.EXPERTS,
            num_experts,
        )
    return num_experts


def check_shape_limits(tokens_per_rank: Any, hidden: Any, num_ranks: Any, num_experts: Any) -> None:
    """The limits that size the buffers: ``T``, ``H``, ``R``, ``E``."""
    check_tokens_per_rank(tokens_per_rank)
    check_hidden(hidden)
    check_ranks(num_ranks)
    check_experts(num_experts, num_ranks)


def check_timeout_us(value: Any, name: str = "timeout_us") -> int:
    check_int(name, value, Limit.TIMEOUT)
    if not -1 <= value <= MAX_TIMEOUT_US:
        raise tag_limit(
            ValueError(
                f"{name}={value} is invalid: use -1 (wait forever) or a duration in microseconds, "
                f"0 <= {name} <= {MAX_TIMEOUT_US}"
            ),
            Limit.TIMEOUT,
            value,
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
        raise tag_limit(
            ValueError(
                f"{name} has entry {bad}: entries must be -1 (no expert) or in [0, "
                f"num_experts={num_experts})"
            ),
            Limit.EXPERT_ID,
            bad,
        )
    if topk_idx_cpu.shape[1] > 1:
        ordered = topk_idx_cpu.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            row = int(repeated.any(dim=1).nonzero()[0, 0])
            raise tag_limit(
                ValueError(
                    f"{name} row {row} lists an expert twice ({topk_idx_cpu[row].tolist()}): "
                    f"each token may select an expert at most once"
                ),
                Limit.EXPERT_TWICE,
                row,
            )
