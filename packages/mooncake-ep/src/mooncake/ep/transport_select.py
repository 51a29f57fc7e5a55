"""Which device transport the fast path uses, decided the same way on every rank (collective).

Order (``MOONCAKE_EP_TRANSPORT=auto``, the default): **P2P** (CUDA IPC) when every rank's GPU is
reachable from every other (one host), then **NVSHMEM** (``mooncake.ep.nvshmem_path``: the
NVSHMEM-mode library is built and, across hosts, NVSHMEM has a remote transport: an RDMA device
and ``NVSHMEM_REMOTE_TRANSPORT`` not ``none``), then **proxy** (``mooncake.ep.proxy_path``:
kernels post puts and signals into a host ring; a native proxy thread per rank carries them over
the transfer engine: shared memory on one host, TCP across hosts), else the portable path.
``MOONCAKE_EP_TRANSPORT=p2p | p2p-staged | nvshmem | proxy`` forces one (it must work on every
rank, else every rank raises ``TransportUnavailable``); ``portable`` forces the portable path;
an unknown value raises ValueError naming the modes available.

Collectives of a selection (``select``, and every fast path's ``update_ep_member``, so survivors
updating and a replacement constructing meet): 1 ``info`` (``probe``: can this rank run the
kernels at all), 2 ``modes`` (each rank's verdict per mode), then the chosen mode's own three
exchanges (P2P: IPC handles, opened, ready; proxy: endpoints, opened, ready; NVSHMEM: unique id,
initialised, ready).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Optional

from . import _cuda
from .fast_path_setup import (
    exchange_and_map,
    first_failure,
    gather,
    probe,
    reachability,
    requested_transport,
)
from .path import PathReplaced, PathUnavailable, TransportUnavailable

logger = logging.getLogger("mooncake.ep")

MODE_ORDER = ("p2p", "nvshmem", "proxy")  # the auto order
P2P_MODES = ("p2p", "p2p-staged")


def proxy_unavailable() -> Optional[str]:
    """None when this process can run the proxy mode (mooncake.transfer's host proxy), else why."""
    try:
        from mooncake.transfer.proxy import HostProxy  # noqa: F401
    except ImportError as exc:
        return f"mooncake.transfer's host proxy cannot be imported ({exc})"
    return None


def local_verdicts(
    lib: Optional[ctypes.CDLL],
    info: dict,
    infos: list[dict],
    rank: int = 0,
    requested: str = "auto",
) -> dict:
    """This rank's verdict per mode: None = usable, else the reason (never raises). NVSHMEM is
    judged only where it could be chosen (forced, or auto with P2P out of reach), so that a
    one-host group never loads NVSHMEM."""
    verdicts: dict = {
        "p2p": None,
        "proxy": proxy_unavailable(),
        "nvshmem": "not judged (P2P serves this rank)",
    }
    try:
        verdicts["p2p"] = reachability(lib, info["device"], infos)
    except Exception as exc:
        verdicts["p2p"] = f"{type(exc).__name__}: {exc}"
    several_hosts = len({i["host"] for i in infos}) > 1
    if requested == "nvshmem" or (
        requested == "auto" and (several_hosts or verdicts["p2p"] is not None)
    ):
        from .nvshmem_path import nvshmem_unavailable

        verdicts["nvshmem"] = nvshmem_unavailable(infos, rank, len(infos))
    return verdicts


def choose_mode(requested: str, infos: list[dict], verdicts: list[Optional[dict]]) -> tuple:
    """``(mode, reason)`` from every rank's ``probe`` answer and per-mode verdicts, or ``(None,
    why no mode works)``. Pure: the same inputs give the same answer on every rank."""
    names = sorted({str(i.get("transport")) for i in infos if i is not None})
    if len(names) > 1:
        return None, f"MOONCAKE_EP_TRANSPORT differs between ranks ({', '.join(names)})"
    order = MODE_ORDER if requested == "auto" else (requested,)
    skipped = []
    for mode in order:
        key = "p2p" if mode in P2P_MODES else mode
        bad = None
        for rank, v in enumerate(verdicts):
            if v is None:
                bad = f"rank {rank} did not answer"
            elif v.get(key):
                bad = f"rank {rank}: {v[key]}"
            if bad:
                break
        if bad is None:
            forced = "" if requested == "auto" else f"MOONCAKE_EP_TRANSPORT={requested}; "
            earlier = "".join(f"{s}; " for s in skipped)
            what = {
                "p2p": "every peer's GPU is reachable through CUDA IPC (P2P device transport)",
                "p2p-staged": "P2P mappings with the staged put path (p2p-staged)",
                "proxy": "puts and signals go through a host proxy over the transfer engine "
                "(proxy device transport)",
                "nvshmem": "kernels reach peers through NVSHMEM (NVSHMEM device transport)",
            }[mode]
            return mode, f"{forced}{earlier}{what}"
        skipped.append(f"{mode}: {bad}")
    return None, "; ".join(skipped) if skipped else f"no transport for {requested!r}"


def agree(group: Any, num_ep_buffer_bytes: int) -> tuple:
    """Collectives 1-2: ``(info, infos, mode or None, reason)``, the same mode on every rank."""
    requested = requested_transport()
    info = probe(num_ep_buffer_bytes)
    infos = gather(group, info)  # collective 1
    failure = first_failure(infos)
    if failure is not None:
        return info, infos, None, failure
    lib = _cuda.load()
    verdicts = gather(
        group, local_verdicts(lib, info, infos, group.rank(), requested)
    )  # collective 2
    mode, reason = choose_mode(requested, infos, verdicts)
    return info, infos, mode, reason


def decline(reason: str, infos: list) -> tuple[None, str]:
    """``(None, reason)``, or TransportUnavailable when MOONCAKE_EP_TRANSPORT forced a mode on
    any rank. Decided from every rank's ``probe`` answer (``infos``, gathered in collective 1), so
    every rank raises or none does, even when the setting differs between ranks."""
    forced = {requested_transport()} | {
        str(i.get("transport")) for i in infos if isinstance(i, dict) and i.get("transport")
    }
    forced.discard("auto")
    if forced:
        raise TransportUnavailable(
            f"MOONCAKE_EP_TRANSPORT={'/'.join(sorted(forced))} was requested (on at least one "
            f"rank) but cannot be used: {reason}"
        )
    return None, reason


def setup(group: Any, info: dict, infos: list[dict], nbytes: int, mode: str, reason: str) -> Any:
    """Collectives 3-5 of ``mode`` (3-6 for proxy: its group secret first): its path, or
    ``(None, reason)`` (same verdict everywhere)."""
    grid = min(i["num_sms"] for i in infos)
    if mode == "proxy":
        from .proxy_path import setup_proxy

        return setup_proxy(group, info, infos, nbytes, grid, reason)
    if mode == "nvshmem":
        from .nvshmem_path import setup_nvshmem

        return setup_nvshmem(group, info, infos, nbytes, grid, reason)
    from .fast_path import CudaP2PPath

    lib = _cuda.load()
    ctx = None
    local_error = None
    try:
        out = ctypes.c_void_p()
        rc = lib.mep_ctx_create(
            info["device"], group.rank(), group.size(), nbytes, ctypes.byref(out)
        )
        _cuda.check(lib, rc, f"allocating the {nbytes}-byte symmetric buffer")
        ctx = out.value
    except Exception as exc:
        local_error = f"{type(exc).__name__}: {exc}"
    failure = exchange_and_map(lib, ctx, group, local_error)  # collectives 3-5
    if failure is not None:
        if ctx is not None:
            lib.mep_ctx_destroy(ctx)
        return None, failure
    path = CudaP2PPath(group, lib, ctx, info["device"], nbytes, grid)
    path.reason = f"{reason}; {nbytes} byte symmetric buffer"
    return path


def select(group: Any, num_ep_buffer_bytes: int) -> Any:
    """Collective. A fast path (``CudaP2PPath``, ``NvshmemPath`` or ``ProxyPath``) on every rank,
    or ``(None, reason)`` on every rank (``TransportUnavailable`` when a forced mode cannot be
    used)."""
    info, infos, mode, reason = agree(group, num_ep_buffer_bytes)
    if mode is None:
        return decline(reason, infos)
    result = setup(group, info, infos, num_ep_buffer_bytes, mode, reason)
    if isinstance(result, tuple):
        return decline(result[1], infos)
    logger.info("rank %d: EP transport %s (%s)", group.rank(), mode, result.reason)
    return result


def reselect(path: Any, nbytes: int) -> tuple:
    """A fast path's ``update_ep_member``, collectives 1-2: ``(info, infos, mode)`` when ``path``
    keeps its mode (it then runs its own collectives 3-5); raises ``PathReplaced`` with the new
    path (collectives 3-5 of the new mode done) or ``PathUnavailable``, the same on every rank."""
    info, infos, mode, reason = agree(path.group, nbytes)
    if mode is None:
        raise PathUnavailable(f"update_ep_member: the fast path cannot continue: {reason}")
    if mode == path.mode:
        return info, infos, mode
    new = setup(path.group, info, infos, nbytes, mode, reason)
    if isinstance(new, tuple):
        raise PathUnavailable(f"update_ep_member: the fast path cannot continue: {new[1]}")
    raise PathReplaced(new)
