"""Reductions over CPU tensors, applied in a fixed rank order so every rank gets identical bits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import native

_INT_TYPES = {
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    getattr(torch, "uint16", torch.uint8),
    getattr(torch, "uint32", torch.uint8),
    getattr(torch, "uint64", torch.uint8),
}

SUPPORTED = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR")


_NAMES = {
    getattr(dist.ReduceOp.RedOpType, n): n
    for n in ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM")
    if hasattr(dist.ReduceOp.RedOpType, n)
}


_NAMES_BY_INT = {int(k): v for k, v in _NAMES.items()}


def op_name(op) -> str:
    """Name of a ``ReduceOp`` (or ``ReduceOp.RedOpType``)."""
    key = getattr(op, "op", op)
    try:
        name = _NAMES_BY_INT.get(int(key))  # ints hash faster than the pybind enum
    except (TypeError, ValueError):
        name = None
    if name is None:
        raise ValueError(f"unsupported reduce op {op!r}")
    return name


def check_op(name: str, dtype: torch.dtype) -> None:
    if name == "SUM":
        return
    if name not in SUPPORTED:
        raise ValueError(f"reduce op {name} is not supported by mooncake (supported: {SUPPORTED})")
    if name in ("BAND", "BOR", "BXOR") and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"reduce op {name} needs an integer or bool tensor, got dtype {dtype}")
    if dtype.is_complex and name in ("MIN", "MAX"):
        raise ValueError(f"reduce op {name} is not defined for complex dtype {dtype}")


_BINARY = {
    "SUM": torch.add,
    "AVG": torch.add,
    "PRODUCT": torch.mul,
    "MIN": torch.minimum,
    "MAX": torch.maximum,
    "BAND": torch.bitwise_and,
    "BOR": torch.bitwise_or,
    "BXOR": torch.bitwise_xor,
}


_FAST = {
    "SUM": torch.add,
    "PRODUCT": torch.mul,
    "MIN": torch.minimum,
    "MAX": torch.maximum,
}


def reduce_fresh(acc: torch.Tensor, parts: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """``reduce_into`` for an ``acc`` that aliases none of ``parts`` (the small-op hot path:
    the common ops go straight to one torch call per extra part; the result is identical)."""
    if native.reduce(acc, parts, name):
        return acc
    fn = _FAST.get(name)
    if fn is None or len(parts) < 2 or acc.dtype in _SLOW:
        return reduce_into(acc, parts, name)
    fn(parts[0], parts[1], out=acc)
    for p in parts[2:]:
        fn(acc, p, out=acc)
    return acc


def fold_left(
    work: torch.Tensor,
    rest: Sequence[torch.Tensor],
    name: str,
    count: int,
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """``work`` op= each of ``rest`` in order (torch ops, on ``work``'s device), then AVG's
    division by ``count`` (the number of contributors): the element-wise steps every reduction
    of this backend takes, on the CPU and on the device."""
    for p in rest:
        if convert is not None:
            p = convert(p)
        if name in ("SUM", "AVG"):
            if work.dtype == torch.bool:
                work.logical_or_(p)
            else:
                work.add_(p)
        elif name == "PRODUCT":
            if work.dtype == torch.bool:
                work.logical_and_(p)
            else:
                work.mul_(p)
        elif name == "MIN":
            torch.minimum(work, p, out=work)
        elif name == "MAX":
            torch.maximum(work, p, out=work)
        elif name == "BAND":
            work.bitwise_and_(p)
        elif name == "BOR":
            work.bitwise_or_(p)
        elif name == "BXOR":
            work.bitwise_xor_(p)
        else:
            raise ValueError(f"reduce op {name} is not supported by mooncake")
    if name == "AVG" and count > 1:
        if work.dtype.is_floating_point or work.dtype.is_complex:
            work.div_(count)
        elif work.dtype != torch.bool:
            work.copy_(torch.div(work, count, rounding_mode="trunc"))
    return work


def _to_float(p: torch.Tensor) -> torch.Tensor:
    return p.float()


def reduce_into(acc: torch.Tensor, parts: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """``acc`` = reduction of ``parts`` (in order). ``acc`` may alias ``parts[0]``'s values.
    Natively (``native.reduce``) where the engine covers the dtype and op, else torch ops."""
    if native.reduce(acc, parts, name):
        return acc
    fp8 = acc.dtype in _FP8
    rest = parts[1:]
    if (
        not fp8
        and acc.dtype != torch.bool
        and rest
        and acc.data_ptr() != parts[0].data_ptr()
        and all(p.data_ptr() != acc.data_ptr() for p in rest)
    ):
        _BINARY[name](parts[0], rest[0], out=acc)  # first pair in one pass, no copy
        rest = rest[1:]
    elif acc.data_ptr() != parts[0].data_ptr():
        acc.copy_(parts[0])
    work = acc.float() if fp8 else acc
    fold_left(work, rest, name, len(parts), _to_float if fp8 else None)
    if fp8:
        acc.copy_(work.to(acc.dtype))
    return acc


_FP8 = {
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
}
_SLOW = _FP8 | {torch.bool}


# (dtype, op) -> (dtype code, op code) of the transfer engine's native fold
# (``TransferEngine.exchange_round(reduce=...)``), which computes exactly what ``reduce_fresh``
# does for these: element-wise left folds in rank order, floats without reassociation, bf16/f16
# rounded after every step, integers wrapping (``native.CODES``). Other dtypes and ops (AVG,
# NaN-aware float MIN/MAX, bool, fp8, complex) stay in torch.
# The fold inside the small all_reduce's native round covers the 32/64-bit types (other types
# are folded by ``reduce_fresh``, natively too, right after that call).
_NATIVE_FOLD = {
    (dt, name): code
    for (dt, name), code in native.CODES.items()
    if dt in (torch.float32, torch.float64, torch.int32, torch.int64)
    and name in ("SUM", "PRODUCT", "MIN", "MAX")
}


def native_fold(dtype: torch.dtype, name: str):
    """(dtype code, op code) when the engine can fold this reduction natively, else None."""
    return _NATIVE_FOLD.get((dtype, name))
