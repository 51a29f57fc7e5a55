"""ctypes loader of ``_mooncake_ep_cuda.so``, the torch-free CUDA library of the fast path.

The library is built by the package's CMake when nvcc is present (sm_90 and up) and installed
next to this file; ``MOONCAKE_EP_CUDA_LIB`` may point at another build. ``load()`` raises
``OSError`` with the reason when it is missing or cannot be loaded.

Every dispatch and combine launch takes one argument block, ``MepOpArgs`` (``csrc/ep_args.h``),
mirrored here by a ``ctypes.Structure``. Both sides describe its layout (field names, types,
offsets, sizes, the struct's size and alignment, and the flag / phase / transport constants) and
hash the description; ``load()`` refuses a library whose hash differs from this module's
(``ArgsLayoutMismatch``, an ``OSError`` naming both hashes, the library and the first difference).

The benchmark library ``_mooncake_ep_bench.so`` (``mep_bench_launch``) is separate: only
``load_bench()`` (``mooncake.ep._cuda.bench``) loads it; the production library has no bench code.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from typing import Optional

LIB_NAME = "_mooncake_ep_cuda.so"
BENCH_LIB_NAME = "_mooncake_ep_bench.so"
# 3: proxy mode (mep_ctx_create_host, mep_ctx_set_ring, transport kind 2); 4: MepOpArgs argument
# block (was an int64 vector), mep_args_layout_hash, mep_bench_launch in its own library;
# 5: transport kind 3 (NVSHMEM, only in _mooncake_ep_nvshmem.so), mep_has_nvshmem
ABI_VERSION = 5
IPC_HANDLE_BYTES = 64
INVALID_ARGUMENT = 100000  # the library's own error codes; others are cudaError_t / CUresult values
# mep_dispatch / mep_combine asked to write cached outputs on a stream under graph capture: nothing
# was launched (the caller retries with fresh outputs)
CAPTURING = 100001

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_bench_lib: Optional[ctypes.CDLL] = None

# ---------------------------------------------------------------------------- the argument block

_u64, _i64, _i32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32
# ctypes type -> (C type name in ep_args.h, struct module code). uint64_t fields (addresses,
# offsets: all below 2**63) are packed as "q", the same bytes, about 13 ns a call cheaper than "Q".
_TYPES = {_u64: ("uint64_t", "q"), _i64: ("int64_t", "q"), _i32: ("int32_t", "i")}


class MepOpArgs(ctypes.Structure):
    """``csrc/ep_args.h`` ``MepOpArgs``, field for field (see there for what each one means). The
    per-call fields lead, contiguous, so ``packer`` writes them with one ``struct.pack_into``."""

    _fields_ = [
        # per call: dispatch's statistics, then the fields of both ops
        ("cum_stats", _u64),
        ("stream", _u64),
        ("x", _u64),
        ("topk_idx", _u64),
        ("active_ranks", _u64),
        ("timeout_us", _i64),
        ("num_tokens", _i32),
        ("topk", _i32),
        ("flags", _i32),
        ("phases", _i32),
        # per call: combine's inputs and output
        ("topk_weights", _u64),
        ("out", _u64),
        ("src_info", _u64),
        ("layout_range", _u64),
        # fixed by a dispatch's output tensors
        ("recv_x", _u64),
        ("recv_scales", _u64),
        ("recv_count", _u64),
        # fixed by the shape, the buffer half, the transport and the grid
        ("max_tokens", _i32),
        ("hidden", _i32),
        ("num_experts", _i32),
        ("half", _i32),
        ("transport", _i32),
        ("grid", _i32),
        ("off_dispatch_send", _u64),
        ("off_dispatch_recv", _u64),
        ("off_dispatch_signals", _u64),
        ("off_combine_send", _u64),
        ("off_combine_recv", _u64),
        ("off_combine_signals", _u64),
        ("off_control", _u64),
        ("msg_bytes", _u64),
    ]


# ep_args.h MEP_OP_ARGS_CONSTANTS, in its order (part of the layout description).
CONSTANTS = {
    "MEP_FLAG_FP8": 1,
    "MEP_FLAG_ROUND_SCALE": 2,
    "MEP_FLAG_UE8M0": 4,
    "MEP_FLAG_CACHED_OUTPUTS": 8,
    "MEP_PHASE_SEND": 1,
    "MEP_PHASE_RECV": 2,
    "MEP_TRANSPORT_P2P": 0,
    "MEP_TRANSPORT_P2P_STAGED": 1,
    "MEP_TRANSPORT_PROXY": 2,
    "MEP_TRANSPORT_NVSHMEM": 3,
}
FLAG_FP8 = CONSTANTS["MEP_FLAG_FP8"]
FLAG_ROUND_SCALE = CONSTANTS["MEP_FLAG_ROUND_SCALE"]
FLAG_UE8M0 = CONSTANTS["MEP_FLAG_UE8M0"]
# The outputs are the caller's cached set: on a stream under graph capture the library launches
# nothing and answers CAPTURING (the op is issued again with fresh outputs).
FLAG_CACHED_OUTPUTS = CONSTANTS["MEP_FLAG_CACHED_OUTPUTS"]
PHASE_SEND = CONSTANTS["MEP_PHASE_SEND"]
PHASE_RECV = CONSTANTS["MEP_PHASE_RECV"]
TRANSPORT_P2P = CONSTANTS["MEP_TRANSPORT_P2P"]
TRANSPORT_P2P_STAGED = CONSTANTS["MEP_TRANSPORT_P2P_STAGED"]
TRANSPORT_PROXY = CONSTANTS["MEP_TRANSPORT_PROXY"]
TRANSPORT_NVSHMEM = CONSTANTS["MEP_TRANSPORT_NVSHMEM"]


def layout_description(cls: type = MepOpArgs, constants: Optional[dict] = None) -> str:
    """The string both sides hash (ep_args.h ``args_layout_description``):
    ``MepOpArgs/<size>/<align>``, then ``;<name>:<type>:<offset>:<size>`` per field, then
    ``;#<name>=<value>`` per constant."""
    parts = [f"MepOpArgs/{ctypes.sizeof(cls)}/{ctypes.alignment(cls)}"]
    for item in cls._fields_:
        name, ctype = item[0], item[1]
        field = getattr(cls, name)
        if ctype not in _TYPES:
            raise TypeError(f"{cls.__name__}.{name}: type {ctype.__name__} has no C name here")
        parts.append(f"{name}:{_TYPES[ctype][0]}:{field.offset}:{field.size}")
    for name, value in (CONSTANTS if constants is None else constants).items():
        parts.append(f"#{name}={value}")
    return ";".join(parts)


def layout_hash(description: str) -> int:
    """FNV-1a, 64 bit, over the description's bytes (ep_args.h ``fnv1a64``)."""
    h = 0xCBF29CE484222325
    for byte in description.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


ARGS_LAYOUT = layout_description()
ARGS_LAYOUT_HASH = layout_hash(ARGS_LAYOUT)


def packer(*names: str) -> tuple[struct.Struct, int]:
    """(``struct.Struct``, byte offset) writing the fields ``names`` of a ``MepOpArgs`` with one
    ``pack_into(args, offset, *values)``: they must be consecutive in the struct, with no padding
    between them (TypeError otherwise, at import)."""
    fields = {item[0]: item[1] for item in MepOpArgs._fields_}
    start = getattr(MepOpArgs, names[0]).offset
    at, codes = start, []
    for name in names:
        field = getattr(MepOpArgs, name)
        if field.offset != at:
            raise TypeError(f"MepOpArgs.{name} is at offset {field.offset}, not {at}: not packable")
        codes.append(_TYPES[fields[name]][1])
        at += field.size
    return struct.Struct("<" + "".join(codes)), start


class ArgsLayoutMismatch(OSError):
    """The library's ``MepOpArgs`` layout differs from this package's (a stale or foreign build)."""


def _first_difference(theirs: str, ours: str) -> str:
    a, b = theirs.split(";"), ours.split(";")
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else "(nothing)"
        y = b[i] if i < len(b) else "(nothing)"
        if x != y:
            return f"item {i}: library {x!r}, Python {y!r}"
    return "the descriptions are equal (a hash function mismatch)"


def check_layout(path: str, lib_hash: int, lib_layout: Optional[str]) -> None:
    """Raise ``ArgsLayoutMismatch`` unless ``lib_hash`` is this module's ``ARGS_LAYOUT_HASH``."""
    if lib_hash == ARGS_LAYOUT_HASH:
        return
    detail = _first_difference(lib_layout, ARGS_LAYOUT) if lib_layout else "no description"
    raise ArgsLayoutMismatch(
        f"{path}: MepOpArgs layout hash 0x{lib_hash:016x} differs from this package's "
        f"0x{ARGS_LAYOUT_HASH:016x} (mooncake.ep._cuda.MepOpArgs); first difference: {detail}. "
        "The library and the Python package come from different builds: rebuild the package "
        "(or point MOONCAKE_EP_CUDA_LIB at a matching build)"
    )


# ---------------------------------------------------------------------------- loading


def library_path() -> str:
    return os.environ.get("MOONCAKE_EP_CUDA_LIB") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), LIB_NAME
    )


def bench_library_path() -> str:
    """``MOONCAKE_EP_BENCH_LIB``, else ``_mooncake_ep_bench.so`` next to the production library."""
    return os.environ.get("MOONCAKE_EP_BENCH_LIB") or os.path.join(
        os.path.dirname(os.path.abspath(library_path())), BENCH_LIB_NAME
    )


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_u64, c_void_p, c_char_p = (
        ctypes.c_int,
        ctypes.c_uint64,
        ctypes.c_void_p,
        ctypes.c_char_p,
    )
    p_int, p_u32 = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint32)
    sigs = {
        "mep_abi_version": (c_int, []),
        "mep_has_nvshmem": (c_int, []),
        "mep_args_layout_hash": (c_u64, []),
        "mep_args_layout": (c_char_p, []),
        "mep_last_error": (c_char_p, []),
        "mep_device_info": (c_int, [c_int, c_char_p, c_int, p_int, p_int, p_int]),
        "mep_can_reach": (c_int, [c_int, c_char_p, p_int]),
        "mep_ctx_create": (c_int, [c_int, c_int, c_int, c_u64, ctypes.POINTER(c_void_p)]),
        "mep_ctx_create_host": (
            c_int,
            [c_int, c_int, c_int, c_u64, c_u64, ctypes.POINTER(c_void_p)],
        ),
        "mep_ctx_set_ring": (c_int, [c_void_p, c_u64, c_u64]),
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
        # microsecond a call. Callers pass (ctypes.c_void_p, ctypes.byref(MepOpArgs)), both
        # made once and reused.
        "mep_dispatch": (c_int, None),
        "mep_combine": (c_int, None),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        if argtypes is not None:
            fn.argtypes = argtypes


def open_library(path: str, extra: Optional[dict] = None) -> ctypes.CDLL:
    """``path`` loaded, its C ABI declared (plus ``extra``: name -> (restype, argtypes)), its ABI
    version and ``MepOpArgs`` layout checked. Raises OSError with the reason. (``load()`` for the
    production library; ``mooncake.ep.nvshmem_path`` for the NVSHMEM one.)"""
    lib = ctypes.CDLL(path)
    try:
        _declare(lib)
        for name, (restype, argtypes) in (extra or {}).items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except AttributeError as exc:
        raise OSError(f"{path} lacks a symbol ({exc}): stale build") from exc
    version = lib.mep_abi_version()
    if version != ABI_VERSION:
        raise OSError(
            f"{path} has ABI version {version}, this package needs {ABI_VERSION}: stale build"
        )
    check_layout(path, lib.mep_args_layout_hash(), lib.mep_args_layout().decode())
    return lib


def load() -> ctypes.CDLL:
    """The loaded library (cached). Raises OSError with the reason when it is unusable."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not os.path.exists(path):
            raise OSError(f"{path} does not exist (the package was built without nvcc)")
        _lib = open_library(path)
        return _lib


def load_bench() -> ctypes.CDLL:
    """The benchmark library (cached; benchmarks only), after ``load()``: it links against the
    production library, which must be loaded first (the bench library then binds to that one).
    Raises OSError with the reason when it is missing, stale or foreign."""
    global _bench_lib
    load()
    with _lock:
        if _bench_lib is not None:
            return _bench_lib
        path = bench_library_path()
        if not os.path.exists(path):
            raise OSError(f"{path} does not exist (the package was built without nvcc)")
        lib = ctypes.CDLL(path)
        try:
            lib.mep_bench_args_layout_hash.restype = ctypes.c_uint64
            lib.mep_bench_args_layout_hash.argtypes = []
            lib.mep_bench_launch.restype = ctypes.c_int
            lib.mep_bench_launch.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(MepOpArgs),
                ctypes.POINTER(ctypes.c_double),
            ]
        except AttributeError as exc:
            raise OSError(f"{path} lacks a symbol ({exc}): stale build") from exc
        check_layout(path, lib.mep_bench_args_layout_hash(), None)
        _bench_lib = lib
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
