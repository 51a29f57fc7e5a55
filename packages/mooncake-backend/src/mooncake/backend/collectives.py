"""Collective algorithms, written only against ``Exchange`` (send / recv / recv_each).

Each function runs one attempt among ``x.members`` and returns a ``commit`` callable that
publishes the result into the caller's tensors. The process group calls it only after the
agreement step confirmed that no member failed, so inputs stay intact until then and an attempt
that met a failure can be re-run among the survivors from the same inputs.

Algorithms by size: small payloads go directly to every peer (one message step, latency-bound);
large all-reduces use a direct reduce-scatter + all-gather (each rank reduces 1/n of the tensor,
2(n-1)/n of the data crosses the wire per rank, the bandwidth-optimal volume in two steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch

from . import bulk, native
from .exchange import Exchange, even_chunks, no_commit, tensor_bytes
from .reduce_ops import native_fold, reduce_fresh, reduce_into

Commit = Callable[[], None]
SMALL_ALLREDUCE_BYTES = 64 * 1024
SMALL_BROADCAST_BYTES = 64 * 1024  # up to this size a broadcast is one symmetric fused round


def allreduce(x: Exchange, t: torch.Tensor, op: str, last: bool = False) -> Commit:
    """``last``: this call is the op's only communication (not one tensor of a coalesced op), so
    a small one may run the agreement's first round in its native call (``Exchange.exchange``)."""
    flat = _flat(t)
    nbytes = flat.numel() * flat.element_size()
    members = x.members
    if len(members) == 1:
        return no_commit  # the reduction over one contributor is its own input (AVG too)
    if nbytes <= SMALL_ALLREDUCE_BYTES or flat.numel() < len(members):
        return _allreduce_direct(x, flat, op, last)
    if bulk.ALLREDUCE_MIN_BYTES and nbytes >= bulk.ALLREDUCE_MIN_BYTES:
        c = bulk.allreduce(x, flat, op)  # shared-memory arenas (bulk.py)
        if c is not None:
            return c
    return _allreduce_rs_ag(x, flat, op)


def _allreduce_direct(x: Exchange, flat: torch.Tensor, op: str, last: bool) -> Commit:
    peers = x.peers
    rows, result, addrs = x.scratch.small(x.scratch_scope(), flat, peers)
    fold = native_fold(flat.dtype, op) if last else None
    if fold is not None:
        # When every payload and every vote arrives clean, the agreement is decided inside the
        # native call, which then folds the rows straight into ``flat`` (the commit).
        ptr = flat.data_ptr()
        fold = (*fold, flat.numel(), ptr, ptr, x.members.index(x.me))
    got = x.exchange(peers, 0, flat, addrs, lambda src, n: rows[src], last, fold)
    return allreduce_direct_commit(x, flat, op, fold is not None, got, rows, result)


def allreduce_direct_commit(
    x: Exchange,
    flat: torch.Tensor,
    op: str,
    folded: bool,
    got: set[int],
    rows: dict[int, torch.Tensor],
    result: torch.Tensor,
) -> Commit:
    """The commit of a direct all_reduce whose one round returned ``got`` (the sources whose
    row landed in ``rows``); ``folded``: the round was asked to fold the rows natively."""
    if folded and x.voted == ():
        return no_commit  # decided and committed natively
    if len(got) != len(x.peers):
        return no_commit
    me = x.me
    reduce_fresh(result, [flat if r == me else rows[r] for r in x.members], op)
    return lambda: native.copy(flat, result, len(x.members))


def _allreduce_rs_ag(x: Exchange, flat: torch.Tensor, op: str) -> Commit:
    members = x.members
    idx = {r: i for i, r in enumerate(members)}
    chunks = even_chunks(flat.numel(), len(members))
    my_start, my_size = chunks[idx[x.me]]
    # Phase 0: reduce-scatter.
    for p in x.peers:
        s, n = chunks[idx[p]]
        x.send(p, 0, flat[s : s + n])
    scope = x.scratch_scope()
    bufs = {p: x.scratch.get(f"{scope}rs{i}", my_size, flat.dtype) for i, p in enumerate(x.peers)}
    got = x.recv_each(x.peers, 0, lambda src, n: bufs[src])
    mine = flat[my_start : my_start + my_size]
    result = x.scratch.get(f"{scope}result", flat.numel(), flat.dtype)
    my_out = result[my_start : my_start + my_size]
    if len(got) == len(x.peers):
        parts = [mine if r == x.me else bufs[r] for r in members]
        reduce_into(my_out, parts, op)
    # Phase 1: all-gather of the reduced chunks, landing in place in ``result``.
    x.send_many(x.peers, 1, my_out)
    got = x.recv_each(
        x.peers, 1, lambda src, n: result[chunks[idx[src]][0] : sum(chunks[idx[src]])]
    )
    if len(got) != len(x.peers) or x.failed:
        return no_commit
    return lambda: native.copy(flat, result, len(x.members))


def broadcast(x: Exchange, t: torch.Tensor, root: int, last: bool = False) -> Commit:
    """``last``: this call is the op's only communication (not one tensor of a coalesced op),
    so its one message round may also run the agreement's first round (see ``allreduce``)."""
    flat = t.reshape(-1)
    if root not in x.members:
        return no_commit  # the root failed before: every survivor keeps its tensor unchanged
    nbytes = flat.numel() * flat.element_size()
    if bulk.BROADCAST_MIN_BYTES and nbytes >= bulk.BROADCAST_MIN_BYTES and len(x.members) > 1:
        c = bulk.broadcast(x, flat, root, last)  # shared-memory arenas (bulk.py)
        if c is not None:
            return c
    if nbytes <= SMALL_BROADCAST_BYTES and len(x.members) > 1:
        return _broadcast_direct(x, flat, root, last)
    if x.me == root:
        x.send_many(x.peers, 0, flat)
        return no_commit
    tmp = x.scratch.get(x.scratch_scope() + "bcast", flat.numel(), flat.dtype)
    if not x.recv(root, 0, tmp):
        return no_commit
    return lambda: native.copy(flat, tmp, len(x.members))


def _broadcast_direct(x: Exchange, flat: torch.Tensor, root: int, last: bool) -> Commit:
    """A small broadcast as one symmetric round: the root sends its buffer to every peer, the
    others send the same header without payload, so the data, the agreement's first round and
    the DECIDED run in one native call (``Exchange.exchange(last=True)``), as a small all_reduce
    does; a root that only sent would take two calls and a Python step between them."""
    rows, _, addrs = x.scratch.small(x.scratch_scope(), flat, x.peers)
    # Only the root's row is landed: every other peer's message is the header alone (dest 0).
    dests = [a if p == root else 0 for p, a in zip(x.peers, addrs)]
    got = x.exchange(
        x.peers, 0, flat, dests, lambda src, n: rows[src] if src == root else None, last,
        send=x.me == root,
    )  # fmt: skip
    return broadcast_direct_commit(x, flat, root, got, rows)


def broadcast_direct_commit(
    x: Exchange, flat: torch.Tensor, root: int, got: set[int], rows: dict[int, torch.Tensor]
) -> Commit:
    """The commit of a direct broadcast whose one round returned ``got`` (the root's row landed
    in ``rows[root]`` when the root is in it)."""
    if x.me == root or root not in got:
        return no_commit
    src = rows[root]
    return lambda: native.copy(flat, src, len(x.members))


def reduce(x: Exchange, t: torch.Tensor, root: int, op: str) -> Commit:
    flat = t.reshape(-1)
    if root not in x.members:
        return no_commit
    if x.me != root:
        x.send(root, 0, flat)
        return no_commit
    scope = x.scratch_scope()
    bufs = {
        p: x.scratch.get(f"{scope}{j}", flat.numel(), flat.dtype) for j, p in enumerate(x.peers)
    }
    got = x.recv_each(x.peers, 0, lambda src, n: bufs[src])
    if len(got) != len(x.peers):
        return no_commit
    parts = [flat if r == x.me else bufs[r] for r in x.members]
    result = reduce_into(x.scratch.get(f"{scope}out", flat.numel(), flat.dtype), parts, op)
    return lambda: native.copy(flat, result, len(x.members))


def _collect(x: Exchange, outs: Sequence[torch.Tensor], own: torch.Tensor) -> Commit:
    """Land every peer's payload in ``outs[peer]``; the commit writes ``own`` into ``outs[me]``
    and zeroes the slots of ranks that are not members (never stale data)."""
    x.recv_each(x.peers, 0, lambda src, n: _flat(outs[src]))
    return collect_commit(outs, own, x.me, x.members)


def collect_commit(
    outs: Sequence[torch.Tensor], own: torch.Tensor, me: int, members: list[int]
) -> Commit:
    """The commit of an op whose peers' payloads landed in ``outs[peer]``: ``own`` into
    ``outs[me]``, zeroes into the slots of ranks that are not ``members``."""

    def commit() -> None:
        mine = outs[me]
        if mine.numel():
            native.copy(_flat(mine), _flat(own), len(members))
        if len(members) != len(outs):
            for r, o in enumerate(outs):
                if r not in members:
                    native.zero(o)

    return commit


def allgather(
    x: Exchange, outs: Sequence[torch.Tensor], t: torch.Tensor, last: bool = False
) -> Commit:
    """``outs[r]`` receives rank r's ``t``; slots of non-members are zeroed. ``last``: as for
    ``broadcast``."""
    flat = t.reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if bulk.ALLGATHER_MIN_BYTES and nbytes >= bulk.ALLGATHER_MIN_BYTES and len(x.members) > 1:
        c = bulk.allgather(x, outs, flat, last)  # shared-memory arenas (bulk.py)
        if c is not None:
            return c
    if nbytes and len(x.members) > 1:
        # One symmetric round: every peer's payload lands straight in its output slot (outputs
        # are written before the commit, as ``_collect`` does; only the commit fills this
        # rank's own slot and zeroes non-members'), and with ``last`` the agreement's first
        # round and the DECIDED run in the same native call.
        peers = x.peers
        dests = [_flat(outs[p]).data_ptr() for p in peers]
        x.exchange(peers, 0, flat, dests, lambda src, n: _flat(outs[src]), last)
        return collect_commit(outs, flat, x.me, x.members)
    x.send_many(x.peers, 0, flat)
    return _collect(x, outs, flat)


def gather(
    x: Exchange, outs: Optional[Sequence[torch.Tensor]], t: torch.Tensor, root: int
) -> Commit:
    flat = t.reshape(-1)
    if root not in x.members:
        return no_commit
    if x.me != root:
        x.send(root, 0, flat)
        return no_commit
    assert outs is not None
    return _collect(x, outs, flat)


def scatter(
    x: Exchange, out: torch.Tensor, ins: Optional[Sequence[torch.Tensor]], root: int
) -> Commit:
    flat = out.reshape(-1)
    if root not in x.members:
        return no_commit
    if x.me == root:
        assert ins is not None
        for p in x.peers:
            x.send(p, 0, ins[p].reshape(-1))
        return lambda: native.copy(flat, ins[x.me].reshape(-1), len(x.members))
    tmp = x.scratch.get(x.scratch_scope() + "scatter", flat.numel(), flat.dtype)
    if not x.recv(root, 0, tmp):
        return no_commit
    return lambda: native.copy(flat, tmp, len(x.members))


def reduce_scatter(
    x: Exchange,
    out: torch.Tensor,
    ins: Sequence[torch.Tensor],
    op: str,
    whole: Optional[torch.Tensor] = None,
) -> Commit:
    """``out`` = reduction over members of their ``ins[me]``; ``whole``: one contiguous tensor
    whose consecutive rows are ``ins`` (``reduce_scatter_single``), when the caller has it."""
    flat = _flat(out)
    peers = x.peers
    if peers and flat.numel() and tensor_bytes(flat) * len(ins) <= SMALL_ALLREDUCE_BYTES:
        return _reduce_scatter_direct(x, flat, ins, op, whole)
    for p in peers:
        x.send(p, 0, _flat(ins[p]))
    scope = x.scratch_scope()
    if tensor_bytes(flat) <= SMALL_ALLREDUCE_BYTES:
        bufs, result, _ = x.scratch.small(scope, flat, peers)
    else:
        bufs = {
            p: x.scratch.get(f"{scope}{i}", flat.numel(), flat.dtype) for i, p in enumerate(peers)
        }
        result = x.scratch.get(f"{scope}out", flat.numel(), flat.dtype)
    got = x.recv_each(peers, 0, lambda src, n: bufs[src])
    if len(got) != len(peers):
        return no_commit
    me = x.me
    reduce_fresh(result, [_flat(ins[me]) if r == me else bufs[r] for r in x.members], op)
    return lambda: native.copy(flat, result, len(x.members))


def _reduce_scatter_direct(
    x: Exchange,
    flat: torch.Tensor,
    ins: Sequence[torch.Tensor],
    op: str,
    whole: Optional[torch.Tensor],
) -> Commit:
    """A small reduce_scatter as a small all_reduce of the whole input (every rank sends all of
    it, ``len(ins)`` times the bytes a rank needs, in one symmetric round): the data, the
    agreement's first round, the DECIDED and the fold into a scratch row run in one native
    call, as for ``_allreduce_direct``; the commit copies this rank's chunk of that row."""
    chunk = flat.numel()
    if whole is None:
        whole = x.scratch.get(x.scratch_scope() + "rsin", chunk * len(ins), flat.dtype)
        for i, t in enumerate(ins):
            native.copy(whole[i * chunk : (i + 1) * chunk], _flat(t))
    else:
        whole = _flat(whole)
    rows, result, addrs = x.scratch.small(x.scratch_scope(), whole, x.peers)
    fold = native_fold(whole.dtype, op)
    if fold is not None:
        ptr = whole.data_ptr()
        fold = (*fold, whole.numel(), ptr, result.data_ptr(), x.members.index(x.me))
    got = x.exchange(x.peers, 0, whole, addrs, lambda src, n: rows[src], True, fold)
    return reduce_scatter_direct_commit(x, flat, op, whole, fold is not None, got, rows, result)


def reduce_scatter_direct_commit(
    x: Exchange,
    flat: torch.Tensor,
    op: str,
    whole: torch.Tensor,
    folded: bool,
    got: set[int],
    rows: dict[int, torch.Tensor],
    result: torch.Tensor,
) -> Commit:
    """The commit of a direct reduce_scatter whose one round returned ``got`` (the sources whose
    ``whole`` landed in ``rows``); ``folded``: the round was asked to fold them into ``result``."""
    if len(got) != len(x.peers):
        return no_commit
    chunk = flat.numel()
    lo = x.me * chunk
    mine = result[lo : lo + chunk]
    if not folded or x.voted != ():  # not folded natively: reduce this rank's chunk here
        parts = [
            whole[lo : lo + chunk] if r == x.me else rows[r][lo : lo + chunk] for r in x.members
        ]
        reduce_fresh(mine, parts, op)
    return lambda: native.copy(flat, mine, len(x.members))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


def alltoall(x: Exchange, outs: Sequence[torch.Tensor], ins: Sequence[torch.Tensor]) -> Commit:
    """``outs[r]`` receives rank r's ``ins[me]``; slots of non-members are zeroed."""
    for p in x.peers:
        x.send(p, 0, _flat(ins[p]))
    return _collect(x, outs, ins[x.me])


def barrier(x: Exchange) -> Commit:
    """One empty message to and from every peer, in the same native call as the agreement's
    first round and the DECIDED when all is clean (``Exchange.exchange_bytes(last=True)``)."""
    x.exchange_bytes(x.peers, 0, b"", last=True)
    return no_commit


def allgather_bytes(x: Exchange, payload: bytes) -> dict[int, bytes]:
    """Control-plane all-gather of small byte strings (membership, readiness flags)."""
    x.send_many(x.peers, 0, raw=payload)
    out = {x.me: payload}
    for p in x.peers:
        got = x.recv_bytes(p, 0)
        if got is not None:
            out[p] = got
    return out
