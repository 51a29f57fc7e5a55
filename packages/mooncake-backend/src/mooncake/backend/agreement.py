"""Agreement among survivors: which ranks an op attempt excludes, and whether ranks mismatched.

Every rank enters with what its data phase saw (peers that failed or missed the deadline, and a
mismatch flag). Rounds of all-to-all messages flood those sets; a rank decides at the first round
in which it heard from every peer it still believes alive (a "clean" round) and then sends
DECIDED to every peer, which adopts the first DECIDED it reads instead of deciding itself.

Why this is enough here: a peer's messages are delivered in order up to its death (one stream per
peer), so a rank that heard everyone in a round has seen every survivor's data-phase result, and
two ranks that both see a clean round in the same round heard the same messages. A rank that does
not see a clean round (a peer died mid-round) waits one more round and reads a DECIDED from any
rank that did. A peer that is excluded while still alive (it missed the deadline) receives the
DECIDED too, finds itself excluded and stops (``EvictedError``).

Cost without failures: one round of n-1 small messages plus the n-1 DECIDED messages, which the
next op's readers skip as stale.
"""

from __future__ import annotations

import time
from typing import Optional

from . import faults, wire
from .exchange import Exchange, _FutureMessage
from .mailbox import PeerGone


def _read_vote(x: Exchange, src: int, deadline: float) -> Optional[tuple[int, int, int, int]]:
    """Next AGREE/DECIDED of this attempt from ``src`` as (kind, round, excluded, errors)."""
    name = x.names[src]
    while True:
        try:
            data = x.mailbox.recv(name, x.tag, deadline - time.monotonic())
        except PeerGone:
            return None
        if data is None:
            return None
        try:
            if not x._is_current(name, data):
                continue
        except _FutureMessage:
            return None
        hdr = wire.Header.unpack(data)
        if hdr.kind == wire.DATA_NEXT:
            x.mailbox.skip_raw(name, x.tag)
            continue
        if hdr.kind in (wire.DATA_INLINE, wire.DATA_PULL):
            continue  # data this rank stopped waiting for
        rnd, ex, er = wire.unpack_agree(data)
        if hdr.sig != x.sig:
            er |= 1 << src
        return hdr.kind, rnd, ex, er


def agree(x: Exchange, grace: float) -> tuple[set[int], set[int]]:
    """Run the agreement for attempt ``x``. Returns (excluded ranks, ranks that saw a mismatch)."""
    deadline = max(x.deadline, time.monotonic() + grace)
    excluded = wire.mask_of(x.failed)
    errors = (1 << x.me) if x.mismatch else 0
    alive = [p for p in x.peers if not excluded >> p & 1]
    rnd = 0
    decided: Optional[tuple[int, int]] = None
    while decided is None:
        msg = wire.pack_agree(wire.AGREE, x.seq, x.attempt, x.sig, rnd, excluded, errors)
        for p in alive:
            try:
                x.mailbox.send(x.names[p], x.tag, msg)
                faults.hit("agree_send")
            except PeerGone:
                excluded |= 1 << p
        clean = True
        for p in alive:
            if excluded >> p & 1:
                clean = False
                continue
            vote = _read_vote(x, p, deadline)
            if vote is None:
                excluded |= 1 << p
                clean = False
                continue
            kind, _, ex, er = vote
            if kind == wire.DECIDED:
                decided = (ex, er)
                break
            excluded |= ex
            errors |= er
        if decided is None and clean:
            decided = (excluded, errors)
        alive = [p for p in alive if not excluded >> p & 1]
        rnd += 1
    excluded, errors = decided
    final = wire.pack_agree(wire.DECIDED, x.seq, x.attempt, x.sig, rnd, excluded, errors)
    for p in x.peers:
        try:
            x.mailbox.send(x.names[p], x.tag, final)
        except PeerGone:
            pass
    return wire.ranks_of(excluded), wire.ranks_of(errors)
