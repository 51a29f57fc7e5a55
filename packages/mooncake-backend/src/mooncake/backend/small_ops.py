"""The clean path of a small CPU all_reduce, broadcast, all_gather or reduce_scatter in one native
call, without the op protocol's per-attempt objects.

Every op runs through ``protocol.run_op``: an ``Exchange`` per attempt, the algorithm
(``collectives``), the agreement (``protocol.agree``), the commit. A small single-tensor
all_reduce (``collectives._allreduce_direct``) already does all of its work in one native call
(``Exchange.exchange(last=True)`` with a fold): the payloads, the agreement's round-0 votes, the
DECIDED and the reduction into the caller's tensor; the Python around that call (building
those objects) cost about as much again (world 2, 2-core machines, 1 KiB back-to-back: 34-49 us
per op through ``run_op``, 20-36 us through the lane).

A small broadcast (``collectives._broadcast_direct``, below the arena sizes) is the same round
without the fold: the root sends its buffer, the others the header alone, and the root's row is
copied into the caller's tensor after the call. A small all_gather (``collectives.allgather``,
below its arena size) is the same round again: every rank sends its input, and each peer's
payload lands straight in that peer's output slot. A small reduce_scatter
(``collectives._reduce_scatter_direct``) is a small all_reduce of the whole input folded into
a scratch row, of which the commit copies this rank's chunk. ``SmallOps`` below issues the very
same native call, with the same messages byte for byte, from a few values cached per group.
Only when the call returns anything but "every payload and every vote landed clean" does it
build the attempt's ``Exchange`` from the call's results and hand it to the protocol
(``protocol.resume_op``), which goes on exactly as if it had issued the call itself: the
agreement, the exclusion rule, re-runs among the survivors. Whatever the
lane cannot express (an armed fault point, pushed-back messages, a membership change pending,
debug logging) takes ``run_op`` from the start.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

import torch

from mooncake.transfer import copy_buffers

from . import bulk, collectives, faults, native, wire
from .exchange import LANDED, clean_votes, data_round
from .protocol import new_attempt, op_signature, resume_op
from .reduce_ops import native_fold

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

_SCOPE = "s1."  # the scratch scope of an op's first algorithm call (``Exchange.scratch_scope``)


class SmallOps:
    """Per group: the lane, and its op constants cached per (kind, dtype, numel, op or root)."""

    __slots__ = ("_ops", "_pg", "clean", "resumed")

    def __init__(self, pg: MooncakeProcessGroup) -> None:
        self._pg = pg
        self.clean = 0  # ops the lane finished alone
        self.resumed = 0  # ops the lane handed to the protocol after its native call
        # key -> (signature, fold codes or None, bytes), or None (not for the lane)
        self._ops: dict[tuple, Optional[tuple]] = {}

    def _entry(self, t: torch.Tensor, kind: str, arg) -> Optional[tuple]:
        k = (kind, t.dtype, t.numel(), arg)
        e = self._ops.get(k, False)
        if e is False:
            e = None
            nbytes = t.numel() * t.element_size()
            if kind == "allreduce":
                fold = native_fold(t.dtype, arg)
                if fold is not None and nbytes <= collectives.SMALL_ALLREDUCE_BYTES:
                    parts = (arg, ((t.dtype, t.numel()),))
                    e = (op_signature(self._pg, kind, parts), fold, nbytes)
            elif kind == "broadcast":
                if nbytes <= collectives.SMALL_BROADCAST_BYTES and not (
                    bulk.BROADCAST_MIN_BYTES and nbytes >= bulk.BROADCAST_MIN_BYTES
                ):
                    parts = (arg, ((str(t.dtype), t.numel()),))  # as ``broadcast`` signs it
                    e = (op_signature(self._pg, kind, parts), None, nbytes)
            elif kind == "reduce_scatter":  # t: the output; arg: (op, the whole input's bytes)
                op, whole = arg
                fold = native_fold(t.dtype, op)
                if fold is not None and t.numel() and whole <= collectives.SMALL_ALLREDUCE_BYTES:
                    parts = (op, str(t.dtype), t.numel())  # as ``_reduce_scatter_base`` signs it
                    e = (op_signature(self._pg, kind, parts), fold, whole)
                nbytes = whole
            elif nbytes and not (bulk.ALLGATHER_MIN_BYTES and nbytes >= bulk.ALLGATHER_MIN_BYTES):
                # ``arg``: True from ``allgather`` (a list of outputs), False from
                # ``_allgather_base`` (one output tensor); each signs the op its own way.
                dt = (str(t.dtype), t.numel())
                e = (op_signature(self._pg, kind, (dt,) if arg else dt), None, nbytes)
            if e is not None and nbytes >= wire.PULL_MIN:
                e = None
            if len(self._ops) > 256:
                self._ops.clear()
            self._ops[k] = e
        return e

    def _open(self) -> Optional[list[int]]:
        """The sorted members when the lane may run an op now, else None."""
        pg = self._pg
        m = pg.membership
        if (
            pg._evicted is not None
            or not m.admitted
            or m.pending
            or pg._debug
            or faults.armed_point() is not None
            or len(m.members) < 2
        ):
            return None
        return sorted(m.members)

    def _start(self, t: torch.Tensor, kind: str, arg) -> Optional[tuple]:
        """(members, this rank, its peers, signature, fold codes, bytes) when the lane may run
        this op now (``_open``) and the op is for it (``_entry``), else None."""
        members = self._open()
        if members is None:
            return None
        e = self._entry(t, kind, arg)
        if e is None:
            return None
        me = self._pg._rank
        return (members, me, [r for r in members if r != me], *e)

    def allreduce(self, t: torch.Tensor, op: str) -> bool:
        """All-reduce contiguous CPU tensor ``t`` in place; False (nothing done) when the op is
        not for the lane, and the caller runs it through ``protocol.run_op``."""
        st = self._start(t, "allreduce", op)
        if st is None or t.numel() < len(st[0]):
            return False
        members, me, peers, sig, fold, size = st
        rows, result, addrs = self._pg._scratch.small(_SCOPE, t, peers)
        ptr = t.data_ptr()
        fold = (*fold, t.numel(), ptr, ptr, members.index(me))
        ran = self._round(members, peers, sig, size, ptr, True, addrs, fold)
        if ran is None:
            return False
        x, targets, rounds, res = ran
        if x is None:
            return True  # decided, and folded into ``t`` by the native call: committed
        # Anything else: the attempt goes on in the protocol, from this call's results.
        got = x.after_round(peers, targets, 0, lambda src, n: rows[src], size, rounds, res)
        flat = t.reshape(-1)
        commit = collectives.allreduce_direct_commit(x, flat, op, True, got, rows, result)
        body = lambda x: collectives.allreduce(x, t, op, True)  # noqa: E731
        resume_op(self._pg, "allreduce", body, x, commit)
        return True

    def broadcast(self, t: torch.Tensor, root: int) -> bool:
        """Broadcast contiguous CPU tensor ``t`` from group rank ``root``; False as above."""
        st = self._start(t, "broadcast", root)
        if st is None or root not in st[0]:
            return False  # a failed root: the protocol's path leaves every tensor unchanged
        members, me, peers, sig, _, size = st
        rows, _, addrs = self._pg._scratch.small(_SCOPE, t, peers)
        # Only the root's row lands: every other peer's message is the header alone (dest 0).
        dests = [a if p == root else 0 for p, a in zip(peers, addrs)]
        ran = self._round(members, peers, sig, size, t.data_ptr(), me == root, dests, ())
        if ran is None:
            return False
        x, targets, rounds, res = ran
        flat = t.reshape(-1)
        if x is None:
            if me != root:
                native.copy(flat, rows[root], len(members))  # the commit
            return True

        def sink(src: int, n: int):
            return rows[src] if src == root else None

        got = x.after_round(peers, targets, 0, sink, size, rounds, res)
        commit = collectives.broadcast_direct_commit(x, flat, root, got, rows)
        body = lambda x: collectives.broadcast(x, t, root, True)  # noqa: E731
        resume_op(self._pg, "broadcast", body, x, commit)
        return True

    def allgather(self, out, t: torch.Tensor, listed: bool) -> bool:
        """All-gather contiguous CPU tensor ``t``: ``listed`` (from ``allgather``): into the list
        ``out`` (one contiguous CPU tensor per group rank, ``t``'s size each); else (from
        ``_allgather_base``, which signs the op differently) into the rows of the contiguous
        tensor ``out``. False as above."""
        st = self._start(t, "allgather", listed)
        if st is None:
            return False
        members, me, peers, sig, _, size = st
        # Peers' payloads land straight in their output slots (``collectives.allgather``).
        if listed:
            dests = [out[p].data_ptr() for p in peers]
        else:
            base = out.data_ptr()
            dests = [base + p * size for p in peers]
        ran = self._round(members, peers, sig, size, t.data_ptr(), True, dests, ())
        if ran is None:
            return False
        x, targets, rounds, res = ran
        extent = len(out) if listed else self._pg.membership.extent
        if x is None and len(members) == extent:
            copy_buffers(out[me].data_ptr() if listed else base + me * size, t.data_ptr(), size)
            return True  # the commit: this rank's own slot (no slot of a non-member to zero)
        outs = out if listed else list(out.view(extent, -1).unbind(0))
        commit = collectives.collect_commit(outs, t, me, members)
        if x is None:
            commit()
            return True

        def sink(src: int, n: int):
            return outs[src].reshape(-1)

        x.after_round(peers, targets, 0, sink, size, rounds, res)
        body = lambda x: collectives.allgather(x, outs, t, True)  # noqa: E731
        resume_op(self._pg, "allgather", body, x, commit)
        return True

    def reduce_scatter(self, out: torch.Tensor, whole: torch.Tensor, op: str) -> bool:
        """``out`` = this rank's chunk of the reduction of contiguous CPU tensor ``whole`` (one
        chunk of ``out``'s size per group rank) over the members, as a small all_reduce of
        ``whole`` folded natively into a scratch row (``collectives._reduce_scatter_direct``);
        False as above."""
        st = self._start(out, "reduce_scatter", (op, whole.numel() * whole.element_size()))
        if st is None:
            return False
        members, me, peers, sig, fold, size = st
        rows, result, addrs = self._pg._scratch.small(_SCOPE, whole.reshape(-1), peers)
        src = whole.data_ptr()
        fold = (*fold, whole.numel(), src, result.data_ptr(), members.index(me))
        ran = self._round(members, peers, sig, size, src, True, addrs, fold)
        if ran is None:
            return False
        x, targets, rounds, res = ran
        chunk = out.numel() * out.element_size()
        if x is None:  # decided, and folded into ``result``: the commit is this rank's chunk
            copy_buffers(out.data_ptr(), result.data_ptr() + me * chunk, chunk)
            return True
        flat = whole.reshape(-1)
        got = x.after_round(peers, targets, 0, lambda s, n: rows[s], size, rounds, res)
        commit = collectives.reduce_scatter_direct_commit(
            x, out.reshape(-1), op, flat, True, got, rows, result
        )
        ins = list(whole.reshape(self._pg.membership.extent, -1).unbind(0))
        body = lambda x: collectives.reduce_scatter(x, out, ins, op, whole)  # noqa: E731
        resume_op(self._pg, "reduce_scatter", body, x, commit)
        return True

    def _round(self, members, peers, sig, size, addr, send, dests, fold):
        """The op's one native call (``Exchange.exchange(last=True)``'s, byte for byte). None:
        not issued (pushed-back messages wait in the mailbox); else (None, ...) when every
        payload and vote landed clean (decided, the DECIDED sent, the fold done), or (the
        attempt's ``Exchange``, targets, rounds, per-peer results) for the protocol to go on."""
        pg = self._pg
        names = pg.membership.names
        targets = [names[p] for p in peers]
        mailbox = pg._world.mailbox
        tag = pg._tag
        if mailbox.has_back(targets, tag):
            return None
        seq = pg._seq
        pg._seq += 1
        timeout = pg._op_timeout()
        sent_at = time.monotonic()
        rounds, res = data_round(
            mailbox, targets, tag, seq, 0, 0, sig, timeout, addr, size, send, dests,
            clean_votes(seq, 0, sig), pg._grace, fold, pg._max_gap,
        )  # fmt: skip
        if rounds == 2 and all(status is LANDED for status, _ in res):
            self.clean += 1
            return None, targets, rounds, res
        self.resumed += 1
        x = new_attempt(pg, seq, 0, members, sig)
        x.deadline = sent_at + timeout
        x.sent_at = sent_at
        return x, targets, rounds, res
