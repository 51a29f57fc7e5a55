"""NVSHMEM mode of the fast path (``cuda-nvshmem``): the same dispatch/combine kernels, reaching
peers through NVSHMEM's device API (GPU-initiated: IBGDA across nodes, NVLink / P2P inside one).

The kernels of this mode live in ``_mooncake_ep_nvshmem.so``, built next to the production library
when CMake finds the ``nvidia-nvshmem-cu12`` / ``-cu13`` wheel (``MOONCAKE_EP_NVSHMEM=AUTO``); it
links NVSHMEM, the production library does not. ``MOONCAKE_EP_NVSHMEM_LIB`` may point at another
build. Loading preloads the wheel's ``libnvshmem_host.so.3``.

Per rank: NVSHMEM is initialised once per process through the group (rank 0's
``nvshmemx_get_uniqueid``, broadcast with the group's all_gather, then
``nvshmemx_set_attr_uniqueid_args`` + ``nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID)``, as
DeepEP does); the symmetric buffer is one ``nvshmem_malloc`` of ``num_ep_buffer_bytes`` (the
``get_ep_buffer_size_hint`` size). Peers that ``nvshmem_ptr`` maps are reached with stores; when
every rank maps every peer (one node) the kernels run their P2P instantiation over those addresses,
else the NVSHMEM instantiation (``mooncake/device/nvshmem.cuh``: stores to mapped peers, NVSHMEM
puts / signals to the others). Waits are the kernels' own polls of local memory with the op's
deadline, so ``active_ranks`` / ``timeout_us`` behave as on the P2P path.

Recovery: NVSHMEM cannot re-admit a process (``nvshmem_finalize`` hangs once a PE died; a process
cannot initialise NVSHMEM again; teams are subsets of the initial job), so ``update_ep_member``
raises ``RecoveryUnsupported`` naming the proxy mode (``MOONCAKE_EP_TRANSPORT=proxy``). The package
README's "NVSHMEM mode and recovery" has the sources.

Collectives after ``transport_select.agree``: 3 unique id (and each rank's NVSHMEM state), 4
initialised (everyone joined NVSHMEM), 5 ready (symmetric buffer allocated, mappings known, zeroed).

Environment: ``MOONCAKE_EP_NVSHMEM_DIRECT`` = ``auto`` (stores where ``nvshmem_ptr`` maps the peer)
| ``off`` (every transfer to another rank is an NVSHMEM operation; tests of that path on one node);
NVSHMEM's own variables are passed through (defaults set here when unset:
``NVSHMEM_SYMMETRIC_SIZE`` large enough for the buffer, ``NVSHMEM_DISABLE_NVLS=1``, and across
hosts ``NVSHMEM_IB_ENABLE_IBGDA=1``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any, Optional

import torch

from . import _cuda
from .fast_path import CudaP2PPath
from .fast_path_setup import TRANSPORTS, first_failure, gather
from .path import RecoveryUnsupported

logger = logging.getLogger("mooncake.ep")

LIB_NAME = "_mooncake_ep_nvshmem.so"
HEAP_MARGIN = 256 << 20  # NVSHMEM_SYMMETRIC_SIZE default: the buffer plus this
DIRECT_CHOICES = ("auto", "off")
RECOVERY_MESSAGE = (
    "update_ep_member: the NVSHMEM mode (cuda-nvshmem) cannot change its membership: NVSHMEM "
    "cannot re-admit a process into a running job (nvshmem_finalize hangs once a PE has died, a "
    "process cannot initialise NVSHMEM a second time, and teams only split the initial job). The "
    "buffer keeps working for the surviving ranks (the dead one stays masked in active_ranks). "
    "For recovery with replacement ranks use the proxy mode: MOONCAKE_EP_TRANSPORT=proxy"
)

__all__ = ["NvshmemPath", "load", "nvshmem_unavailable", "setup_nvshmem"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_host_lib: Optional[ctypes.CDLL] = None


def library_path() -> str:
    """``MOONCAKE_EP_NVSHMEM_LIB``, else ``_mooncake_ep_nvshmem.so`` next to the production
    library."""
    return os.environ.get("MOONCAKE_EP_NVSHMEM_LIB") or os.path.join(
        os.path.dirname(os.path.abspath(_cuda.library_path())), LIB_NAME
    )


def wheel_lib_dir() -> Optional[str]:
    """The ``nvidia-nvshmem-cu12`` / ``-cu13`` wheel's ``lib`` folder, or None."""
    try:
        import nvidia.nvshmem as pkg  # type: ignore[import-not-found]
    except ImportError:
        return None
    for root in list(getattr(pkg, "__path__", [])):
        lib = os.path.join(root, "lib")
        if os.path.exists(os.path.join(lib, "libnvshmem_host.so.3")):
            return lib
    return None


def direct_stores() -> bool:
    """MOONCAKE_EP_NVSHMEM_DIRECT (``auto`` = True, ``off`` = False); ValueError otherwise."""
    name = os.environ.get("MOONCAKE_EP_NVSHMEM_DIRECT", "auto") or "auto"
    if name not in DIRECT_CHOICES:
        raise ValueError(
            f"MOONCAKE_EP_NVSHMEM_DIRECT={name!r} is not one of {', '.join(DIRECT_CHOICES)}"
        )
    return name == "auto"


def load() -> ctypes.CDLL:
    """The NVSHMEM-mode library (cached), after the wheel's host library. OSError with the reason
    when either is missing or unusable."""
    global _lib, _host_lib
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not os.path.exists(path):
            raise OSError(
                f"{path} does not exist (built only when CMake finds NVSHMEM: "
                "pip install nvidia-nvshmem-cu13 before building the package)"
            )
        lib_dir = wheel_lib_dir()
        if lib_dir is not None and _host_lib is None:
            # RTLD_GLOBAL: the library's NEEDED libnvshmem_host.so.3 resolves to this copy.
            _host_lib = ctypes.CDLL(
                os.path.join(lib_dir, "libnvshmem_host.so.3"), mode=ctypes.RTLD_GLOBAL
            )
        c_int, c_u64, c_void_p = ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p
        p_int = ctypes.POINTER(c_int)
        extra = {
            "mep_nvshmem_uniqueid_bytes": (c_int, []),
            "mep_nvshmem_version": (c_int, []),
            "mep_nvshmem_get_uniqueid": (c_int, [ctypes.c_char_p]),
            "mep_nvshmem_state": (c_int, [p_int, p_int, p_int]),
            "mep_nvshmem_init": (c_int, [c_int, c_int, c_int, ctypes.c_char_p]),
            "mep_ctx_create_nvshmem": (
                c_int,
                [c_int, c_int, c_int, c_u64, c_int, p_int, ctypes.POINTER(c_void_p)],
            ),
        }
        lib = _cuda.open_library(path, extra)
        if lib.mep_has_nvshmem() != 1:
            raise OSError(f"{path} was built without NVSHMEM")
        _lib = lib
        return lib


def nvshmem_state(lib: ctypes.CDLL) -> tuple[int, int, int, int]:
    """(state, rank, nranks, device): state 1 initialised, 0 never, -1 a failed attempt."""
    rank, nranks, device = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    state = lib.mep_nvshmem_state(ctypes.byref(rank), ctypes.byref(nranks), ctypes.byref(device))
    return state, rank.value, nranks.value, device.value


def has_rdma_device() -> bool:
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def nvshmem_unavailable(infos: list[dict], rank: int, size: int) -> Optional[str]:
    """None when this rank can run the NVSHMEM mode with these ranks, else why (never raises).
    Across hosts it needs a remote transport: an RDMA device and NVSHMEM_REMOTE_TRANSPORT other
    than ``none``."""
    try:
        direct_stores()
        lib = load()
        state, r, n, _ = nvshmem_state(lib)
        if state == -1:
            return "an earlier NVSHMEM initialisation failed in this process"
        if state == 1 and (r, n) != (rank, size):
            return (
                f"NVSHMEM is already initialised in this process as rank {r} of {n} "
                f"(now rank {rank} of {size}); NVSHMEM cannot be initialised again"
            )
        if len({i["host"] for i in infos}) > 1:
            remote = os.environ.get("NVSHMEM_REMOTE_TRANSPORT", "")
            if remote.lower() == "none":
                return "ranks are on several hosts and NVSHMEM_REMOTE_TRANSPORT=none"
            if not has_rdma_device() and remote.lower() in ("", "ibrc", "ibgda", "ibdevx"):
                return (
                    "ranks are on several hosts and this host has no RDMA device "
                    "(/sys/class/infiniband is empty): NVSHMEM would have no remote transport"
                )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _set_nvshmem_defaults(nbytes: int, several_hosts: bool) -> None:
    """NVSHMEM's variables this mode relies on, where the caller did not set them (the same on
    every rank: they depend on nothing local)."""
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(nbytes + HEAP_MARGIN))
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    if several_hosts:
        os.environ.setdefault("NVSHMEM_IB_ENABLE_IBGDA", "1")


def _initialise(
    lib: ctypes.CDLL, group: Any, device: int, infos: list[dict], nbytes: int
) -> Optional[str]:
    """Collectives 3-4: NVSHMEM initialised on every rank (or already, with this membership).
    Returns None or the reason (same on every rank)."""
    rank, size = group.rank(), group.size()
    mine: dict = {"ok": True, "reason": None, "uid": None, "state": 0}
    try:
        state, _, _, _ = nvshmem_state(lib)
        mine["state"] = state
        if rank == 0 and state == 0:
            raw = ctypes.create_string_buffer(lib.mep_nvshmem_uniqueid_bytes())
            _cuda.check(lib, lib.mep_nvshmem_get_uniqueid(raw), "nvshmemx_get_uniqueid")
            mine["uid"] = raw.raw
    except Exception as exc:
        mine.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
    answers = gather(group, mine)  # collective 3
    failure = first_failure(answers)
    if failure is None:
        states = {a["state"] for a in answers}
        if len(states) > 1:
            failure = (
                "NVSHMEM is initialised in some processes of the group and not in others "
                f"(states {[a['state'] for a in answers]})"
            )
    init_error = None
    if failure is None and answers[0]["state"] == 0:
        try:
            _set_nvshmem_defaults(nbytes, len({i["host"] for i in infos}) > 1)
            _cuda.check(
                lib,
                lib.mep_nvshmem_init(device, rank, size, answers[0]["uid"]),
                "NVSHMEM initialisation",
            )
        except Exception as exc:
            init_error = f"{type(exc).__name__}: {exc}"
    done = gather(
        group, {"ok": failure is None and init_error is None, "reason": failure or init_error}
    )  # collective 4
    return failure or first_failure(done)


def setup_nvshmem(
    group: Any, info: dict, infos: list[dict], nbytes: int, grid: int, reason: str
) -> Any:
    """Collectives 3-5 of a new NVSHMEM path: ``NvshmemPath`` on every rank or ``(None,
    reason)``."""
    lib = None
    local_error = None
    try:
        lib = load()
    except Exception as exc:
        local_error = f"{type(exc).__name__}: {exc}"
    if lib is None:
        for _ in range(3):  # the others learn why in the same three exchanges
            answers = gather(group, {"ok": False, "reason": local_error})
        return None, first_failure(answers) or str(local_error)
    failure = _initialise(lib, group, info["device"], infos, nbytes)
    ctx = None
    mapped: list[int] = []
    ready_error = None
    if failure is None:
        try:
            size = group.size()
            flags = (ctypes.c_int * size)()
            out = ctypes.c_void_p()
            rc = lib.mep_ctx_create_nvshmem(
                info["device"], group.rank(), size, nbytes, int(direct_stores()), flags,
                ctypes.byref(out),
            )  # fmt: skip
            _cuda.check(lib, rc, f"allocating the {nbytes}-byte NVSHMEM symmetric buffer")
            ctx = out.value
            mapped = list(flags)
        except Exception as exc:
            ready_error = f"{type(exc).__name__}: {exc}"
    ready = gather(
        group,
        {"ok": failure is None and ready_error is None, "reason": failure or ready_error,
         "mapped": mapped},
    )  # fmt: skip  # collective 5
    failure = failure or first_failure(ready)
    if failure is not None:
        if ctx is not None:
            lib.mep_ctx_destroy(ctx)
        return None, failure
    all_mapped = all(all(a["mapped"]) for a in ready)
    return NvshmemPath(group, lib, ctx, info["device"], nbytes, grid, reason, all_mapped, mapped)


class NvshmemPath(CudaP2PPath):
    """``EPPath`` over the kernels with NVSHMEM. ``name = "cuda-nvshmem"``; ``mapped`` says which
    peers this rank reaches with stores (``nvshmem_ptr``); ``kernel_transport`` is ``p2p`` when
    every rank maps every peer (one node), else ``nvshmem``."""

    name = "cuda-nvshmem"

    def __init__(
        self,
        group: Any,
        lib: ctypes.CDLL,
        ctx: int,
        device: int,
        nbytes: int,
        grid: int,
        reason: str,
        all_mapped: bool,
        mapped: list[int],
    ) -> None:
        super().__init__(group, lib, ctx, device, nbytes, grid)
        self.mode = "nvshmem"
        self.mapped = [bool(m) for m in mapped]
        self.kernel_transport = "p2p" if all_mapped else "nvshmem"
        self._transport = TRANSPORTS[self.kernel_transport]
        stores = sum(self.mapped) - 1
        self.reason = (
            f"{reason}; NVSHMEM {lib.mep_nvshmem_version()}: {stores} of {len(mapped) - 1} peers "
            f"by stores (nvshmem_ptr), kernels {self.kernel_transport}; {nbytes} byte symmetric "
            "buffer (nvshmem_malloc)"
        )

    def update_ep_member(self) -> None:
        """Raises ``RecoveryUnsupported`` (before any collective, so on every rank alike): the
        NVSHMEM mode cannot re-admit ranks; use ``MOONCAKE_EP_TRANSPORT=proxy`` for recovery."""
        self._check_usable()
        raise RecoveryUnsupported(RECOVERY_MESSAGE)

    def destroy(self) -> None:
        """Local: waits for this GPU's work and frees the context. The symmetric buffer stays in
        NVSHMEM's heap (``nvshmem_free`` is collective and would block on a dead PE) and NVSHMEM
        stays initialised until the process exits (``nvshmem_finalize`` hangs after a PE died)."""
        if self._ctx is not None:
            try:
                torch.cuda.synchronize(self.device)
            except Exception:
                pass
        super().destroy()
