"""Point-to-point send / recv of any size, with a bounded number of threads.

Wire. Every p2p message of a group travels on one engine tag per group (``wire.CH_P2P``). Each
engine message starts with a header::

    kind u8 | pad 7 | tag i64 | seq u64 | total u64 | offset u64

``seq`` numbers the messages of one sender to one receiver, ``total`` is the message's size and
``offset`` where a part belongs. Two ways to carry ``total`` bytes:

* ``DATA`` (below ``PULL_MIN``): the payload in parts of at most 1 MiB each (the engine's limit
  for one notification is 64 MiB; parts this small also take the same-host shared-memory ring).
* ``PULL`` (from ``PULL_MIN`` on): the sender copies the tensor into registered staging memory
  and sends one message with its descriptor; the receiver reads the bytes one-sidedly (cross-
  memory attach on one host, TCP across hosts) straight into its tensor, then sends ``ACK`` so
  the sender reuses or frees the staging memory (also freed when the receiver dies).

Sends are eager either way: ``send`` returns once the engine queued the message, never waiting
for the receiver, so no send/recv order between two ranks can deadlock.

A sender sends one message's parts back to back (a lock per destination) and the engine delivers
one sender's messages in order, so a receiver has at most one message per peer in flight: a part
at offset 0 (or a PULL) starts a message; a later part that does not continue the message in
flight (same seq, next offset) is a leftover of a message the receiver gave up on (deadline,
size mismatch) and is skipped; a start while a message is still in flight means the sender gave
up on it (its send raised), and the receive it was landing in fails with ``RankFailureError``.

Receives. One progress thread per group (started when a receive or a pulled send is pending,
gone after ``_LINGER`` idle seconds, reading nothing while idle; ``shutdown`` stops it) reads the
group's p2p messages from every live member and
matches each message, by (source, tag), to the earliest posted receive that fits; messages nobody
asked for yet wait in a per-(source, tag) queue (a pulled one costs only its descriptor) and are
matched when a receive is posted. So receives on one (source, tag) complete in posting order, a
receive nobody answers delays no other channel, ``irecv`` before ``isend`` cannot deadlock, and
1000 distinct tags cost no thread. Each receive has a deadline (the group's op timeout:
``TimeoutError``); a receive from a peer that dies fails with ``RankFailureError`` (so do the
any-source receives pending at that moment); a message whose size differs from the receiving
tensor's fails it with ``ValueError`` naming both sizes and is consumed, so the next receive
gets the next message.

The receive side (the matching state ``_Group`` and the per-group progress thread) lives in
``p2p_channels``; this module is the public surface: argument checks, the send path, ``recv``
and ``shutdown``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from mooncake.transfer import TransferError, copy_buffers

from .errors import RankFailureError
from .p2p_channels import (
    _DATA,
    _PULL,
    HEADER,
    HEADER_SIZE,
    _ensure_thread,
    _fmt,
    _Group,
    _io,
    _Recv,
    _Stage,
    _state,
    _states,
)
from .work import MooncakeWork

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")

# One part: header + payload = 1 MiB, the largest notification the same-host ring carries.
PART_BYTES = (1 << 20) - HEADER_SIZE
PULL_MIN = 4 << 20  # messages from this size on are pulled by the receiver
_TAG_MIN, _TAG_MAX = -(1 << 63), (1 << 63) - 1


def shutdown(pg: MooncakeProcessGroup) -> None:
    """The group is being destroyed: fail its pending receives, stop its progress thread, free
    its staging memory (a pulled message not read yet can no longer be read)."""
    g = _states.get(pg)
    if g is None:
        return
    with g.lock:
        g.closed = True
        g.fail_all("recv: the process group was destroyed")
        g.unregister.extend(g.stages)
        g.unregister.extend(g.outstanding.values())
        g.stages.clear()
        g.outstanding.clear()
        g.wake.notify_all()
        io = g.take_io()
    _io(g, pg, io)


class _RecvWork(MooncakeWork):
    """A receive's work; ``_source_rank()`` tells ``dist.recv(src=None)`` who sent."""

    def __init__(self, r: _Recv) -> None:
        super().__init__(r.fut)
        self._recv = r

    def _source_rank(self) -> int:
        self.wait()
        return self._recv.src_rank

    def source_rank(self) -> int:
        return self._source_rank()


# ---------------------------------------------------------------------- entry points
def _check_tag(tag: object) -> int:
    if isinstance(tag, bool) or not isinstance(tag, int):
        raise TypeError(f"tag must be an int, got {type(tag).__name__}")
    if not _TAG_MIN <= tag <= _TAG_MAX:
        raise ValueError(f"tag must be in [-2**63, 2**63), got {tag}")
    return tag


def _one(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    if len(tensors) != 1:
        raise ValueError(f"{what} moves exactly one tensor per call, got {len(tensors)} tensors")
    return tensors[0]


def _peer(pg: MooncakeProcessGroup, r: int, what: str) -> str:
    if not 0 <= r < pg.size():
        raise ValueError(f"{what} rank {r} is out of range for a group of size {pg.size()}")
    if r == pg.rank():
        raise ValueError(f"{what} rank {r} is this rank; p2p needs another rank of the group")
    if r not in pg.members:
        raise RankFailureError(f"{what} rank {r} is not an active member of the group", [r])
    return pg.membership.names[r]


def _send_part(mailbox: Any, peer: str, etag: int, head: bytes, addr: int, n: int) -> list:
    """One message to ``peer``; [(peer, reason)] when it could not be sent (a seam for tests)."""
    return mailbox.send_joined([peer], etag, head, addr, n)


def send(pg: MooncakeProcessGroup, tensors: Sequence[torch.Tensor], dst: int, tag: int) -> None:
    """Send one tensor to group rank ``dst``; returns once the engine queued it (eager)."""
    t = _one(tensors, "send")
    utag = _check_tag(tag)
    name = _peer(pg, dst, "destination")
    src = t if t.device.type == "cpu" else t.detach().cpu()
    total = src.numel() * src.element_size()
    base = src.data_ptr() if total else 0
    g = _state(pg)
    mb = pg._world.mailbox
    stage = None
    if total >= PULL_MIN:
        with g.lock:
            stage = g.take_stage(total)
        if stage is None:
            try:
                stage = _Stage(mb.engine, total)
            except (TransferError, RuntimeError) as e:
                log.debug("p2p: no staging memory (%s); sending %d bytes inline", e, total)
        if stage is not None:
            copy_buffers(stage.buf.data_ptr(), base, total)
    with g.lock:
        lock = g.send_locks.get(name)
        if lock is None:
            lock = g.send_locks[name] = threading.Lock()
    with lock:  # one message's parts back to back
        seq = g.send_seq.get(name, 0)
        g.send_seq[name] = seq + 1
        if stage is not None:
            _send_pulled(g, pg, mb, name, dst, utag, seq, total, stage)
            return
        off = 0
        while True:
            n = min(PART_BYTES, total - off)
            head = HEADER.pack(_DATA, utag, seq, total, off)
            why = _try_send(mb, name, g.etag, head, base + off if n else 0, n)
            if why is not None:
                raise RankFailureError(
                    f"send to rank {dst} (tag {utag}) failed after {off} of {total} bytes: {why}",
                    [dst],
                )
            off += n
            if off >= total:
                return


def _try_send(mb: Any, name: str, etag: int, head: bytes, addr: int, n: int) -> Optional[str]:
    try:
        lost = _send_part(mb, name, etag, head, addr, n)
    except TransferError as e:
        return str(e)
    return lost[0][1] if lost else None


def _send_pulled(
    g: _Group, pg: Any, mb: Any, name: str, dst: int, utag: int, seq: int, total: int, stage: _Stage
) -> None:
    with g.lock:
        g.outstanding[(name, seq)] = stage
        _ensure_thread(g, pg)  # it takes the receiver's ack
        g.wake.notify()
    why = _try_send(mb, name, g.etag, HEADER.pack(_PULL, utag, seq, total, 0) + stage.desc, 0, 0)
    if why is not None:
        with g.lock:
            if g.outstanding.pop((name, seq), None) is not None:
                g.give_stage(stage)
            io = g.take_io()
        _io(g, pg, io)
        raise RankFailureError(
            f"send to rank {dst} (tag {utag}) of {_fmt(total)} failed: {why}", [dst]
        )


def recv(
    pg: MooncakeProcessGroup, tensors: Sequence[torch.Tensor], src: Optional[int], tag: int
) -> dist.Work:
    """Post a receive of one tensor from group rank ``src`` (None: any source)."""
    t = _one(tensors, "recv")
    utag = _check_tag(tag)
    name = _peer(pg, src, "source") if src is not None else None
    r = _Recv(t, name, utag, pg._op_timeout())
    g = _state(pg)
    with g.lock:
        g.post(r)
        if not r.done:
            _ensure_thread(g, pg)
        io = g.take_io()
    _io(g, pg, io)
    return _RecvWork(r)
