"""The clean path of a small CPU all_reduce in one native call, without the op protocol's
per-attempt objects.

Every op runs through ``protocol.run_op``: an ``Exchange`` per attempt, the algorithm
(``collectives``), the agreement (``protocol.agree``), the commit. A small single-tensor
all_reduce (``collectives._allreduce_direct``) already does all of its work in one native call
(``Exchange.exchange(last=True)`` with a fold): the payloads, the agreement's round-0 votes, the
DECIDED and the reduction into the caller's tensor. The Python around that call was most of the
op's host time (measured at world 2 on the 2-core machines: 33 us per op back-to-back, 7 us of
it in the native call).

``allreduce`` below issues the very same native call, with the same messages byte for byte,
from a few values cached per group. Only when the call returns anything but "every payload
and every vote landed clean" does it build the attempt's ``Exchange`` from the call's results
and hand it to the protocol (``protocol.resume_op``), which goes on exactly as if it had issued
the call itself: the agreement, the exclusion rule, re-runs among the survivors. Whatever the
lane cannot express (an armed fault point, pushed-back messages, a membership change pending,
debug logging) takes ``run_op`` from the start.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

import torch

from . import collectives, faults, wire
from .exchange import LANDED
from .protocol import new_attempt, op_signature, resume_op
from .reduce_ops import native_fold

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

_pack = wire.HEADER.pack
_agree = wire.pack_agree
_key = wire.KEY.pack
_SCOPE = "s1."  # the scratch scope of an op's first algorithm call (``Exchange.scratch_scope``)


class SmallAllreduce:
    """Per group: the lane's cached op constants, one entry per (dtype, numel, op)."""

    __slots__ = ("_ops", "_pg", "clean", "resumed")

    def __init__(self, pg: MooncakeProcessGroup) -> None:
        self._pg = pg
        self.clean = 0  # ops the lane finished alone
        self.resumed = 0  # ops the lane handed to the protocol after its native call
        # (dtype, numel, op) -> (signature, fold codes, bytes) or None (not for the lane)
        self._ops: dict[tuple, Optional[tuple]] = {}

    def _entry(self, t: torch.Tensor, op: str) -> Optional[tuple]:
        k = (t.dtype, t.numel(), op)
        e = self._ops.get(k, False)
        if e is False:
            fold = native_fold(t.dtype, op)
            nbytes = t.numel() * t.element_size()
            if (
                fold is None
                or nbytes > collectives.SMALL_ALLREDUCE_BYTES
                or nbytes >= wire.PULL_MIN
            ):
                e = None
            else:
                parts = (op, ((t.dtype, t.numel()),))
                e = (op_signature(self._pg, "allreduce", parts), fold, nbytes)
            if len(self._ops) > 256:
                self._ops.clear()
            self._ops[k] = e
        return e

    def run(self, t: torch.Tensor, op: str) -> bool:
        """All-reduce contiguous CPU tensor ``t`` in place; False (nothing done) when the op is
        not for the lane, and the caller runs it through ``protocol.run_op``."""
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
            return False
        e = self._entry(t, op)
        if e is None or t.numel() < len(m.members):
            return False
        sig, fold, size = e
        members = sorted(m.members)
        me = pg._rank
        peers = [r for r in members if r != me]
        names = m.names
        targets = [names[p] for p in peers]
        mailbox = pg._world.mailbox
        tag = pg._tag
        if mailbox.has_back(targets, tag):
            return False
        seq = pg._seq
        pg._seq += 1
        rows, result, addrs = pg._scratch.small(_SCOPE, t, peers)
        ptr = t.data_ptr()
        head = _pack(seq, 0, wire.DATA_INLINE, 0, sig, size)
        timeout = pg._op_timeout()
        sent_at = time.monotonic()
        rounds, res = mailbox.exchange(
            targets, tag, head, timeout, _key(seq, 0),
            addr=ptr, length=size, expect=head, dests=addrs, dest_len=size,
            second=_agree(wire.AGREE, seq, 0, sig, 0, 0, 0), second_min_timeout=pg._grace,
            then=_agree(wire.DECIDED, seq, 0, sig, 1, 0, 0),
            reduce=(*fold, t.numel(), ptr, ptr, members.index(me)),
            second_max_delay=pg._max_gap,
        )  # fmt: skip
        if rounds == 2 and all(status is LANDED for status, _ in res):
            self.clean += 1
            return True  # decided, and folded into ``t`` by the native call: committed
        # Anything else: the attempt goes on in the protocol, from this call's results.
        self.resumed += 1
        x = new_attempt(pg, seq, 0, members, sig)
        x.deadline = sent_at + timeout
        x.sent_at = sent_at
        got = x.after_round(peers, targets, 0, lambda src, n: rows[src], size, rounds, res)
        flat = t.reshape(-1)
        commit = collectives.allreduce_direct_commit(x, flat, op, True, got, rows, result)
        resume_op(pg, "allreduce", lambda x: collectives.allreduce(x, t, op, True), x, commit)
        return True
