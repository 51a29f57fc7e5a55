"""Point-to-point send/recv. Sends are eager (queued by the engine); receives complete on a
per-group worker thread so ``irecv`` before ``isend`` in ``batch_isend_irecv`` cannot deadlock.
A receive from a peer that fails raises ``RankFailureError`` from ``Work.wait()``."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from . import wire
from .errors import RankFailureError
from .mailbox import PeerGone, copy_payload, head_of
from .work import MooncakeWork

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

_pools: dict[tuple, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _pool(pg: MooncakeProcessGroup, src: Optional[int], tag: int) -> ThreadPoolExecutor:
    """One worker per (group, source, tag): receives on one channel complete in posting order,
    and a receive nobody answers delays no other channel."""
    key = (id(pg), src, tag)
    with _pool_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mooncake-recv")
            _pools[key] = pool
        return pool


def _tag(pg: MooncakeProcessGroup, tag: int) -> int:
    return wire.make_tag(pg._gid, wire.CH_P2P, int(tag) & ((1 << 38) - 1))


def _peer(pg: MooncakeProcessGroup, r: int, what: str) -> str:
    if not 0 <= r < pg.size():
        raise ValueError(f"{what} rank {r} is out of range for a group of size {pg.size()}")
    if r not in pg.members:
        raise RankFailureError(f"{what} rank {r} is not an active member of the group", [r])
    return pg.membership.names[r]


def send(pg: MooncakeProcessGroup, tensors: Sequence[torch.Tensor], dst: int, tag: int) -> None:
    name = _peer(pg, dst, "destination")
    mb, t_ = pg._world.mailbox, _tag(pg, tag)
    try:
        for t in tensors:
            src = t if t.device.type == "cpu" else t.detach().cpu()
            n = src.numel() * src.element_size()
            hdr = wire.Header(wire.DATA_INLINE, 0, 0, 0, 0, n).pack()
            lost = mb.send_joined([name], t_, hdr, src.data_ptr() if n else 0, n)
            if lost:
                raise PeerGone(name, lost[0][1])
    except PeerGone as e:
        raise RankFailureError(f"send to rank {dst} failed: {e.reason}", [dst]) from None


def recv(
    pg: MooncakeProcessGroup, tensors: Sequence[torch.Tensor], src: Optional[int], tag: int
) -> dist.Work:
    names = (
        [_peer(pg, src, "source")]
        if src is not None
        else [pg.membership.names[r] for r in sorted(pg.members) if r != pg.rank()]
    )
    by_name = {v: k for k, v in pg.membership.names.items()}
    mb, t_ = pg._world.mailbox, _tag(pg, tag)
    deadline = time.monotonic() + pg._op_timeout()
    fut: torch.futures.Future = torch.futures.Future()

    def run() -> None:
        try:
            peer = names[0] if len(names) == 1 else None
            for t in tensors:
                host = t if t.device.type == "cpu" else torch.empty_like(t, device="cpu")
                n = host.numel() * host.element_size()
                if peer is None:
                    got = mb.recv_any_note(names, t_, deadline - time.monotonic())
                    if got is None:
                        raise TimeoutError("recv from any source timed out")
                    peer, msg = got
                else:
                    msg = mb.recv_note(peer, t_, deadline - time.monotonic())
                    if msg is None:
                        raise TimeoutError(f"recv from rank {by_name.get(peer)} timed out")
                hdr = wire.Header.unpack(head_of(msg, wire.HEADER_SIZE))
                if hdr.nbytes != n or hdr.kind != wire.DATA_INLINE:
                    raise ValueError(
                        f"recv: rank {by_name.get(peer)} sent {hdr.nbytes} bytes, the tensor holds {n}"
                    )
                copy_payload(msg, host.data_ptr(), n, wire.HEADER_SIZE)
                if host is not t:
                    t.copy_(host)
            fut.set_result(list(tensors))
        except PeerGone as e:
            r = by_name.get(e.peer, -1)
            fut.set_exception(RankFailureError(f"recv: rank {r} failed ({e.reason})", [r]))
        except Exception as e:
            fut.set_exception(e)

    _pool(pg, src, tag).submit(run)
    return MooncakeWork(fut)
