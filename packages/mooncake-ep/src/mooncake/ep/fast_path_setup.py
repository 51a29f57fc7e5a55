"""Collective setup of the fast path (``mooncake.ep.fast_path``): whether every rank can use it,
and the exchange and mapping of the buffers' CUDA IPC handles.

``fast_path.select`` and ``CudaP2PPath.update_ep_member`` run the same four exchanges through the
group, so survivors updating and a replacement constructing meet: ``info`` (can this rank use the
path, ``probe``), ``handles`` (IPC handle of each rank's buffer), ``opened`` (did every rank map
every peer), ``ready`` (every rank zeroed its signal words); the last three are
``exchange_and_map``. Each exchange is two all_gathers (``gather``); every rank gets the same
answers, so every rank reaches the same verdict.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import _cuda
from .path import control_device

# Kernel transport kinds (MepOpArgs.transport: csrc/ep_args.h MEP_TRANSPORT_*).
TRANSPORTS = {
    "p2p": _cuda.TRANSPORT_P2P,
    "p2p-staged": _cuda.TRANSPORT_P2P_STAGED,
    "proxy": _cuda.TRANSPORT_PROXY,
    "nvshmem": _cuda.TRANSPORT_NVSHMEM,
}
# MOONCAKE_EP_TRANSPORT values: auto (P2P inside a host, else NVSHMEM where it initialises with a
# remote transport, else proxy, else portable) or one forced.
TRANSPORT_CHOICES = ("auto", "p2p", "p2p-staged", "nvshmem", "proxy", "portable")
# MOONCAKE_EP_PROXY_TRANSPORT: how the proxy's engine reaches peers (auto: shm on one host, tcp
# across hosts; tcp forces TCP even on one host).
PROXY_ENGINE_TRANSPORTS = ("auto", "tcp", "shm", "cma")


def host_identity() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)


def gather(group: Any, obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` (two all_gathers on the group's control device; numpy-free,
    unlike ``all_gather_object``). A rank that did not answer (zero-filled slot) gives None."""
    size = group.size()
    device = control_device(group)
    payload = pickle.dumps(obj)
    sizes = torch.zeros(size, dtype=torch.int64, device=device)
    _all_gather_single(sizes, torch.tensor([len(payload)], dtype=torch.int64, device=device), group)
    lengths = sizes.cpu().tolist()
    width = max(lengths)
    mine = torch.zeros(width, dtype=torch.uint8, device="cpu")
    mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    everyone = torch.zeros(size * width, dtype=torch.uint8, device=device)
    _all_gather_single(everyone, mine.to(device), group)
    raw = everyone.cpu()
    return [
        pickle.loads(bytes(raw[r * width : r * width + n].tolist())) if n > 0 else None
        for r, n in enumerate(lengths)
    ]


def first_failure(answers: list[dict]) -> Optional[str]:
    for rank, answer in enumerate(answers):
        if answer is None:
            return f"rank {rank} did not answer"
        if not answer.get("ok"):
            return f"rank {rank}: {answer.get('reason')}"
    return None


def requested_transport() -> str:
    """MOONCAKE_EP_TRANSPORT (default ``auto``), validated: ValueError naming the value and the
    choices."""
    name = os.environ.get("MOONCAKE_EP_TRANSPORT", "auto") or "auto"
    if name not in TRANSPORT_CHOICES:
        raise ValueError(
            f"MOONCAKE_EP_TRANSPORT={name!r} is not one of {', '.join(TRANSPORT_CHOICES)}"
        )
    return name


def proxy_engine_transport() -> Optional[str]:
    """MOONCAKE_EP_PROXY_TRANSPORT (default ``auto`` = None: the engine picks per peer)."""
    name = os.environ.get("MOONCAKE_EP_PROXY_TRANSPORT", "auto") or "auto"
    if name not in PROXY_ENGINE_TRANSPORTS:
        raise ValueError(
            f"MOONCAKE_EP_PROXY_TRANSPORT={name!r} is not one of "
            f"{', '.join(PROXY_ENGINE_TRANSPORTS)}"
        )
    return None if name == "auto" else name


def transport_kind() -> tuple[int, str]:
    """Kernel transport of the P2P path: ``p2p-staged`` when requested, else ``p2p``."""
    name = "p2p-staged" if requested_transport() == "p2p-staged" else "p2p"
    return TRANSPORTS[name], name


def probe(num_ep_buffer_bytes: int) -> dict:
    """This rank's answer to 'can you use the fast path' (never raises)."""
    info: dict = {
        "ok": False,
        "reason": "",
        "host": host_identity(),
        "bus_id": "",
        "transport": "",
    }
    try:
        # Every rank reports its setting, also when it cannot take a fast path: a forced mode on
        # any rank makes every rank raise (transport_select.decline).
        info["transport"] = requested_transport()
        if num_ep_buffer_bytes <= 0:
            info["reason"] = (
                "num_ep_buffer_bytes=0 (pass Buffer.get_ep_buffer_size_hint(T, H, R, E) to use it)"
            )
            return info
        if not torch.cuda.is_available():
            info["reason"] = "CUDA is not available in this process"
            return info
        try:
            lib = _cuda.load()
        except OSError as exc:
            info["reason"] = f"the CUDA library is not usable: {exc}"
            return info
        device = torch.cuda.current_device()
        bus = ctypes.create_string_buffer(64)
        major, minor, sms = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        _cuda.check(lib, lib.mep_device_info(device, bus, 64, major, minor, sms), "mep_device_info")
        if major.value < 9:
            info["reason"] = (
                f"GPU {device} is sm_{major.value}{minor.value}; the kernels need sm_90 or newer"
            )
            return info
        info.update(ok=True, bus_id=bus.value.decode(), device=device, num_sms=sms.value)
    except Exception as exc:
        info.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
    return info


def reachability(lib: ctypes.CDLL, device: int, infos: list[dict]) -> Optional[str]:
    """None when this rank can map every peer's GPU memory (P2P), else why not."""
    hosts = {i["host"] for i in infos}
    if len(hosts) > 1:
        return f"ranks are on {len(hosts)} hosts; P2P needs one host"
    for rank, info in enumerate(infos):
        out = ctypes.c_int()
        _cuda.check(
            lib,
            lib.mep_can_reach(device, info["bus_id"].encode(), ctypes.byref(out)),
            "mep_can_reach",
        )
        if not out.value:
            return f"GPU {info['bus_id']} of rank {rank} is not peer-accessible from GPU {device}"
    return None


def exchange_and_map(
    lib: ctypes.CDLL, ctx: Any, group: Any, local_error: Optional[str]
) -> Optional[str]:
    """Collectives 2-4 (handles, opened, ready). Returns None on success, else the reason (same on
    every rank)."""
    handle = None
    if local_error is None:
        try:
            raw = ctypes.create_string_buffer(_cuda.IPC_HANDLE_BYTES)
            _cuda.check(lib, lib.mep_ctx_export(ctx, raw), "mep_ctx_export")
            handle = raw.raw
        except Exception as exc:
            local_error = f"{type(exc).__name__}: {exc}"
    answers = gather(group, {"ok": local_error is None, "reason": local_error, "handle": handle})
    failure = first_failure(answers)
    opened_error = None
    if failure is None:
        try:
            for peer, answer in enumerate(answers):
                _cuda.check(
                    lib,
                    lib.mep_ctx_set_peer(ctx, peer, answer["handle"]),
                    f"mapping rank {peer}'s buffer",
                )
            _cuda.check(lib, lib.mep_ctx_commit(ctx), "mep_ctx_commit")
        except Exception as exc:
            opened_error = f"{type(exc).__name__}: {exc}"
    opened = gather(
        group, {"ok": failure is None and opened_error is None, "reason": failure or opened_error}
    )
    failure = failure or first_failure(opened)
    ready_error = None
    if failure is None:
        try:
            _cuda.check(lib, lib.mep_ctx_reset(ctx), "mep_ctx_reset")
        except Exception as exc:
            ready_error = f"{type(exc).__name__}: {exc}"
    ready = gather(
        group, {"ok": failure is None and ready_error is None, "reason": failure or ready_error}
    )
    return failure or first_failure(ready)
