"""The backend's own reductions and copies, on threads it controls.

Torch's CPU kernels split large tensors over the caller's intra-op threads (one per core by
default, what ``mp.spawn`` leaves), and their OpenMP workers spin after each parallel region:
on a host shared by several ranks that spinning took the CPU from the very peers a rank waits
for (all_reduce 1 MiB at world 2 on 2 cores: 6.6 ms with default threads, 0.56 ms with one;
``OMP_WAIT_POLICY=PASSIVE`` 0.63 ms). So the collectives' hot paths call the transfer engine's
native ``reduce_buffers`` / ``copy_buffers`` on raw pointers instead: GIL-free, the caller's
thread plus at most ``threads() - 1`` short-lived helpers for large buffers, never the user's
torch thread pool (whose size the backend never changes). Results are bit-identical to torch's
binary ops folded in member order (see the engine's ``reduce`` docstring); the dtypes and ops the
engine does not cover (float MIN/MAX, AVG, bool, fp8, complex) stay in torch.

``MOONCAKE_BACKEND_THREADS`` (>= 1) caps the threads one reduction or copy may use; by default
``min(4, usable CPUs // ranks)``, at least 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import torch

from mooncake.transfer import copy_buffers, reduce_buffers

_DTYPES = {
    torch.float32: 1,
    torch.float64: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.bfloat16: 5,
    torch.float16: 6,
    torch.int8: 7,
    torch.uint8: 8,
    torch.int16: 9,
}
_FLOAT_OPS = {"SUM": 1, "PRODUCT": 2}
_INT_OPS = {"SUM": 1, "PRODUCT": 2, "MIN": 3, "MAX": 4, "BAND": 5, "BOR": 6, "BXOR": 7}

# (dtype, op name) -> (dtype code, op code) of the engine's native fold.
CODES: dict[tuple[torch.dtype, str], tuple[int, int]] = {
    (dt, name): (code, op)
    for dt, code in _DTYPES.items()
    for name, op in (_FLOAT_OPS if dt.is_floating_point else _INT_OPS).items()
}

_MIN_PARALLEL_BYTES = 2 << 20  # below this one thread (the engine also keeps >= 1 MiB per thread)


def _env_threads() -> Optional[int]:
    raw = os.environ.get("MOONCAKE_BACKEND_THREADS")
    if not raw:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"MOONCAKE_BACKEND_THREADS must be an integer >= 1, got {raw!r}") from None
    if v < 1:
        raise ValueError(f"MOONCAKE_BACKEND_THREADS must be >= 1, got {v}")
    return v


_CAP = _env_threads()
try:
    _CPUS = len(os.sched_getaffinity(0))
except (AttributeError, OSError):
    _CPUS = os.cpu_count() or 1


def threads(nbytes: int, ranks: int) -> int:
    """Threads for one reduction/copy of ``nbytes`` while ``ranks`` ranks of a group do the same."""
    if nbytes < _MIN_PARALLEL_BYTES:
        return 1
    if _CAP is not None:
        return _CAP
    return max(1, min(4, _CPUS // max(1, ranks)))


def _plain(t: torch.Tensor) -> bool:
    return t.is_cpu and t.is_contiguous()


def reduce(acc: torch.Tensor, parts: Sequence[torch.Tensor], name: str) -> bool:
    """``acc`` = ``parts`` folded with ``name`` in order, natively; False (nothing done) when the
    engine does not cover the dtype/op or a tensor is not a contiguous CPU tensor of ``acc``'s
    dtype and size. ``acc`` may be ``parts[0]`` (or alias it exactly)."""
    code = CODES.get((acc.dtype, name))
    if code is None or not _plain(acc):
        return False
    n = acc.numel()
    dt = acc.dtype
    ptrs = []
    for p in parts:
        if p.dtype != dt or p.numel() != n or not _plain(p):
            return False
        ptrs.append(p.data_ptr())
    if n and ptrs:
        reduce_buffers(
            code[0], code[1], n, ptrs, acc.data_ptr(), threads(n * dt.itemsize, len(ptrs))
        )
    return True


def copy(dst: torch.Tensor, src: torch.Tensor, ranks: int = 1) -> None:
    """``dst[:] = src``: the bytes of contiguous CPU tensors of one byte size natively (dtypes may
    differ: arena regions are bytes), else torch's ``copy_`` (same dtype and shape rules)."""
    n = src.numel() * src.element_size()
    if dst.numel() * dst.element_size() == n and _plain(dst) and _plain(src):
        if n:
            copy_buffers(dst.data_ptr(), src.data_ptr(), n, threads(n, ranks))
        return
    dst.copy_(src)


def zero(t: torch.Tensor) -> None:
    """``t.zero_()`` without torch's thread pool for contiguous CPU tensors."""
    n = t.numel() * t.element_size()
    if n and _plain(t):
        import ctypes

        ctypes.memset(t.data_ptr(), 0, n)
    elif n:
        t.zero_()
