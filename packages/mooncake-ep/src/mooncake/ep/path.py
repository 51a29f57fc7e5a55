"""The interface both paths implement, and how ``Buffer`` picks one.

The fast path (``mooncake.ep.fast_path``, CUDA kernels over the device transport) is optional: it
may be missing (no CUDA build), or refuse the group (CPU tensors, a peer it cannot reach). Then the
portable path (``PortablePath``) serves. Every rank must end up on the same path, so after the local
choice the ranks compare choices (one tiny all_gather) and all fall back to the portable path if
any rank could not take the fast one.

Environment: ``MOONCAKE_EP_PATH`` = ``auto`` (default) | ``portable`` | ``fast``; the ``path=``
argument of ``Buffer`` wins over it. ``MOONCAKE_EP_TRANSPORT`` picks the fast path's transport
(``mooncake.ep.transport_select``; ``portable`` forces the portable path). Both must be the same on
every rank.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from .membership import backend_name, collective_devices
from .portable_path import PortablePath

logger = logging.getLogger("mooncake.ep")

PATH_CHOICES = ("auto", "portable", "fast")
_PATH_CODES = {"portable": 1}  # any other path name -> 2 (a fast path); 0 = no answer (failed rank)


class PathUnavailable(RuntimeError):
    """A path's ``update_ep_member`` found that it cannot continue, with the same verdict on every
    rank after the same collectives as its selection (``Buffer`` then falls back to the portable
    path, as a new ``Buffer``'s selection does)."""


class TransportUnavailable(RuntimeError):
    """``MOONCAKE_EP_TRANSPORT`` forced a transport that cannot run here (raised on every rank,
    after the same collectives)."""


class RecoveryUnsupported(RuntimeError):
    """``update_ep_member`` was called on a path whose transport cannot change its membership
    (the NVSHMEM mode: NVSHMEM cannot re-admit a process into a running job). Raised on every rank
    before anything is exchanged; the message names the mode to use instead. The path keeps
    working for the ranks it has (failed ones stay masked in ``active_ranks``)."""


class PathReplaced(PathUnavailable):
    """A fast path's ``update_ep_member`` chose another transport than its own (membership
    changed what can reach what); ``.path`` is the new path, already set up with the same
    collectives a new ``Buffer`` runs. ``Buffer`` switches to it."""

    def __init__(self, path: Any) -> None:
        super().__init__(f"the transport changed: now {path.name} ({path.reason})")
        self.path = path


@runtime_checkable
class EPPath(Protocol):
    """One implementation of dispatch/combine. ``Buffer`` has validated every argument before a
    call reaches a path, so paths may assume well-formed inputs (they still check what needs the
    data, like expert ids, before sending).

    Optionally, ``dispatch_runner`` / ``combine_runner`` (see ``CudaP2PPath``): the op specialised
    on an argument signature ``Buffer`` validated, which ``Buffer`` keeps with the signature and
    calls instead of ``dispatch`` / ``combine`` while the signature repeats. A path whose ops
    only read the first ``R`` entries of ``active_ranks`` (its address) sets ``reads_active_prefix
    = True``; others get a view of exactly ``R`` entries when the caller passes a longer tensor."""

    name: str  # "portable" | "cuda-p2p" | ...
    reason: str  # why this path was selected

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        active_ranks: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        timeout_us: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor],
    ) -> tuple[Any, torch.Tensor, tuple, Any, Optional[Callable[[], None]]]: ...

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        active_ranks: torch.Tensor,
        timeout_us: int,
        handle: tuple,
        zero_copy: bool,
        async_finish: bool,
        return_recv_hook: bool,
        out: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, Any, Optional[Callable[[], None]]]: ...

    def get_next_combine_buffer(self, handle: tuple) -> torch.Tensor: ...

    def update_ep_member(self) -> None: ...

    def destroy(self) -> None: ...


def requested_path(path: Optional[str]) -> str:
    choice = path if path is not None else os.environ.get("MOONCAKE_EP_PATH", "auto")
    if choice not in PATH_CHOICES:
        raise ValueError(
            f"path={choice!r} is not one of {PATH_CHOICES} (argument path= or MOONCAKE_EP_PATH)"
        )
    return choice


def _try_fast_path(group: Any, num_ep_buffer_bytes: int) -> tuple[Optional[EPPath], str]:
    try:
        from mooncake.ep import fast_path
    except ImportError as exc:
        return None, f"fast path not available ({exc})"
    try:
        result = fast_path.select(group, num_ep_buffer_bytes)
    except TransportUnavailable:
        raise  # a forced transport: the same verdict on every rank
    except Exception as exc:
        logger.warning(
            "fast path selection raised %s: %s; falling back to the portable path",
            type(exc).__name__,
            exc,
        )
        return None, f"fast path selection raised {type(exc).__name__}: {exc}"
    if isinstance(result, tuple):
        _, reason = result
        return None, f"fast path declined: {reason}"
    return result, result.reason


def path_code(path: EPPath) -> int:
    return _PATH_CODES.get(path.name, 2)


def control_device(group: Any) -> torch.device:
    """Device for the small control collectives of this group (CPU when the group can)."""
    devices = collective_devices(group)
    if "cpu" in devices:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agree_on_path(group: Any, local: EPPath, forced: bool) -> EPPath:
    """Collective: every rank learns every rank's choice; if they differ, all use the portable path.

    A rank that does not answer (zero slot, Mooncake backend after a failure) is ignored.
    """
    num_ranks = group.size()
    device = control_device(group)
    mine = torch.tensor([path_code(local)], dtype=torch.int64, device=device)
    everyone = torch.zeros(num_ranks, dtype=torch.int64, device=device)
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather_single(everyone, mine, group=group)
    answers = everyone.cpu().tolist()
    portable_ranks = [r for r, c in enumerate(answers) if c == 1]
    if forced and portable_ranks:
        raise RuntimeError(f"path='fast' was requested but ranks {portable_ranks} cannot use it")
    codes = [c for c in answers if c != 0]
    if all(c == codes[0] for c in codes):
        return local
    reason = (
        f"ranks {portable_ranks} could not use the fast path, so every rank uses the portable path"
    )
    if local.name != PortablePath.name:
        local.destroy()
        return PortablePath(group, reason)
    local.reason = reason
    return local


def select_path(group: Any, num_ep_buffer_bytes: int, path: Optional[str]) -> EPPath:
    """Local choice (see the module docstring); call ``agree_on_path`` next."""
    choice = requested_path(path)
    if choice == "portable":
        return PortablePath(group, "requested (path='portable' or MOONCAKE_EP_PATH=portable)")
    from .fast_path_setup import proxy_engine_transport, requested_transport  # (import us)

    proxy_engine_transport()  # validated before anything is exchanged, as the transport
    if requested_transport() == "portable":
        if choice == "fast":
            raise ValueError(
                "path='fast' (or MOONCAKE_EP_PATH=fast) contradicts MOONCAKE_EP_TRANSPORT=portable"
            )
        return PortablePath(group, "requested (MOONCAKE_EP_TRANSPORT=portable)")
    fast, reason = _try_fast_path(group, num_ep_buffer_bytes)
    if fast is not None:
        return fast
    if choice == "fast":  # agree_on_path raises on every rank, so no rank is left waiting
        return PortablePath(group, reason)
    return PortablePath(group, f"{reason}; using collectives of backend {backend_name(group)!r}")
