"""ctypes loader of ``_mooncake_ep_cuda.so``, the torch-free CUDA library of the fast path.

The library is built by the package's CMake when nvcc is present (sm_90 and up) and installed
next to this file; ``MOONCAKE_EP_CUDA_LIB`` may point at another build. ``load()`` raises
``OSError`` with the reason when it is missing or cannot be loaded.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Optional

LIB_NAME = "_mooncake_ep_cuda.so"
ABI_VERSION = 2
IPC_HANDLE_BYTES = 64
INVALID_ARGUMENT = 100000  # the library's own error codes; others are cudaError_t / CUresult values
# mep_dispatch / mep_combine asked to write cached outputs on a stream under graph capture: nothing
# was launched (the caller retries with fresh outputs)
CAPTURING = 100001

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


def library_path() -> str:
    return os.environ.get("MOONCAKE_EP_CUDA_LIB") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), LIB_NAME
    )


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_u64, c_void_p, c_char_p = (
        ctypes.c_int,
        ctypes.c_uint64,
        ctypes.c_void_p,
        ctypes.c_char_p,
    )
    p_int, p_i64, p_u32, p_double = (
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_double),
    )
    sigs = {
        "mep_abi_version": (c_int, []),
        "mep_last_error": (c_char_p, []),
        "mep_device_info": (c_int, [c_int, c_char_p, c_int, p_int, p_int, p_int]),
        "mep_can_reach": (c_int, [c_int, c_char_p, p_int]),
        "mep_ctx_create": (c_int, [c_int, c_int, c_int, c_u64, ctypes.POINTER(c_void_p)]),
        "mep_ctx_buffer": (c_u64, [c_void_p]),
        "mep_ctx_state": (c_u64, [c_void_p]),
        "mep_ctx_num_sms": (c_int, [c_void_p]),
        "mep_ctx_export": (c_int, [c_void_p, c_char_p]),
        "mep_ctx_set_peer": (c_int, [c_void_p, c_int, c_char_p]),
        "mep_ctx_resize": (c_int, [c_void_p, c_int, c_int]),
        "mep_ctx_commit": (c_int, [c_void_p]),
        "mep_ctx_reset": (c_int, [c_void_p]),
        "mep_ctx_error_flags": (c_int, [c_void_p, p_u32]),
        "mep_ctx_set_cooperative": (c_int, [c_void_p, c_int]),
        "mep_ctx_set_trace": (c_int, [c_void_p, c_u64, c_u64]),
        "mep_ctx_set_launch_api": (c_int, [c_void_p, c_int]),
        "mep_ctx_launch_api": (c_int, [c_void_p]),
        "mep_ctx_destroy": (c_int, [c_void_p]),
        # The per-op calls have no argtypes: ctypes' per-argument conversion costs about a
        # microsecond a call. Callers pass (ctypes.c_void_p, ctypes.c_int64 array).
        "mep_dispatch": (c_int, None),
        "mep_combine": (c_int, None),
        "mep_bench_launch": (c_int, [c_void_p, c_int, c_int, p_i64, p_double]),
        "mep_dispatch_num_args": (c_int, []),
        "mep_combine_num_args": (c_int, []),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        if argtypes is not None:
            fn.argtypes = argtypes


def load() -> ctypes.CDLL:
    """The loaded library (cached). Raises OSError with the reason when it is unusable."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not os.path.exists(path):
            raise OSError(f"{path} does not exist (the package was built without nvcc)")
        lib = ctypes.CDLL(path)
        try:
            _declare(lib)
        except AttributeError as exc:
            raise OSError(f"{path} lacks a symbol ({exc}): stale build") from exc
        version = lib.mep_abi_version()
        if version != ABI_VERSION:
            raise OSError(
                f"{path} has ABI version {version}, this package needs {ABI_VERSION}: stale build"
            )
        _lib = lib
        return lib


class CudaLibraryError(RuntimeError):
    """A call into the CUDA library failed (the message has the CUDA error name)."""


def check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    """Raise for a non-zero return code: ValueError for bad arguments, else CudaLibraryError."""
    if rc == 0:
        return
    message = (lib.mep_last_error() or b"").decode(errors="replace")
    if rc == INVALID_ARGUMENT:
        raise ValueError(f"{what}: {message}")
    raise CudaLibraryError(f"{what} failed (code {rc}): {message}")
