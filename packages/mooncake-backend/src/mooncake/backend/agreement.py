"""Agreement among survivors: which ranks an op attempt excludes, and whether ranks mismatched.

Every rank enters with what its data phase saw (peers that failed or missed the deadline, and a
mismatch flag). Rounds of all-to-all messages flood those sets. A rank decides at the end of a
"clean" round: it heard in this round from exactly the peers it heard from in the previous round
(before round 0: every peer of the attempt), so nobody went missing in between. It then sends
DECIDED to every peer, which adopts the first DECIDED it reads instead of deciding itself.

Why this is enough here: a peer's messages are delivered in order up to its death (one stream per
peer), so a rank that heard the same peers in two consecutive rounds holds every survivor's
knowledge of the previous round, and two ranks that are clean in the same round hold the same
sets. (Round 0 needs every peer: a rank whose data phase already lost a peer has not seen what
that peer saw, so it waits one more round, where it reads a DECIDED or the floods.) A rank that
is not clean waits one more round and reads a DECIDED from any rank that decided. A peer that is
excluded while still alive (it missed the deadline) receives the DECIDED too, finds itself
excluded and stops (``EvictedError``). Each round's messages go out in one native call and come
back in one (``Mailbox.round``); rounds end at the op deadline (plus a grace) at the latest, and
each round either decides or hears from fewer peers, so there are at most n rounds.

Cost without failures: one round of n-1 small messages plus the n-1 DECIDED messages, which the
next op's readers drop natively as stale; the round, the comparison with this rank's own vote and
the DECIDED are one native call (``Mailbox.exchange``).
"""

from __future__ import annotations

import time
from typing import Optional

from . import faults, wire
from .exchange import Exchange, _FutureMessage
from .mailbox import Message, PeerGone, bytes_of
from .wire import H_KIND, H_SIG

Vote = tuple[int, int, int, int]  # (kind, round, excluded mask, errors mask)


def _vote_of(x: Exchange, src: int, msg: Message, deadline: float) -> Optional[Vote]:
    """Interpret one message of this attempt from ``src``; a data message it carries (data this
    rank stopped waiting for) is skipped and the next message read."""
    name = x.names[src]
    try:
        h = x._current(name, msg)
    except _FutureMessage:
        return None
    if h is None:
        return _read_vote(x, src, deadline)
    kind = h[H_KIND]
    if kind == wire.DATA_INLINE or kind == wire.DATA_PULL:
        return _read_vote(x, src, deadline)
    rnd, ex, er = wire.unpack_agree(bytes_of(msg))
    if h[H_SIG] != x.sig:
        er |= 1 << src
    return kind, rnd, ex, er


def _read_vote(x: Exchange, src: int, deadline: float) -> Optional[Vote]:
    """Next AGREE/DECIDED of this attempt from ``src``."""
    name = x.names[src]
    try:
        msg = x.mailbox.recv_note(name, x.tag, deadline - time.monotonic())
    except PeerGone:
        return None
    if msg is None:
        return None
    return _vote_of(x, src, msg, deadline)


def _send_all(x: Exchange, ranks: list[int], msg: bytes, point: Optional[str]) -> int:
    """Send ``msg`` to ``ranks``; returns the mask of those it could not reach."""
    lost = 0
    if point is not None and faults.armed(point):
        for p in ranks:  # fault tests kill this rank between two peers' messages
            try:
                x.mailbox.send(x.names[p], x.tag, msg)
                faults.hit(point)
            except PeerGone:
                lost |= 1 << p
        return lost
    for name, _ in x.mailbox.send_joined([x.names[p] for p in ranks], x.tag, msg):
        lost |= 1 << x._rank_of(name)
    return lost


def _votes(x: Exchange, ranks: list[int], deadline: float) -> list[Optional[Vote]]:
    """This round's message from each of ``ranks`` (None: dead, or silent past the deadline)."""
    names = [x.names[p] for p in ranks]
    if x.mailbox.has_back(names, x.tag):
        return [_read_vote(x, p, deadline) for p in ranks]
    res = x.mailbox.round(names, x.tag, deadline - time.monotonic(), x._key)
    return [
        None if status else _vote_of(x, p, msg, deadline) for p, (status, msg) in zip(ranks, res)
    ]


def agree(x: Exchange, grace: float) -> tuple[set[int], set[int]]:
    """Run the agreement for attempt ``x``. Returns (excluded ranks, ranks that saw a mismatch)."""
    if x.voted == ():  # round 0 already ran clean in the data phase's last native call
        return set(), set()
    deadline = max(x.deadline, time.monotonic() + grace)
    excluded = wire.mask_of(x.failed)
    errors = (1 << x.me) if x.mismatch else 0
    alive = [p for p in x.peers if not excluded >> p & 1]
    prev = set(x.peers)  # the peers heard in the previous round; before round 0: all of them
    rnd = 0
    decided: Optional[tuple[int, int]] = None
    while decided is None:
        msg = wire.pack_agree(wire.AGREE, x.seq, x.attempt, x.sig, rnd, excluded, errors)
        if rnd == 0 and not excluded and not errors and not faults.armed("agree_send"):
            # The common case: every peer's round-0 vote is byte-identical to this rank's own
            # (same attempt, nothing excluded, no mismatch): decided without parsing anything.
            names = [x.names[p] for p in alive]
            if x.voted is not None or not x.mailbox.has_back(names, x.tag):
                readers, votes = _round0(x, alive, names, msg, deadline)
                if readers is None:
                    return set(), set()  # decided; the DECIDED went out in the same call
                excluded |= wire.mask_of(set(alive) - set(readers))
            else:  # pushed-back messages: send, then read them one by one
                excluded |= _send_all(x, alive, msg, "agree_send")
                readers = [p for p in alive if not excluded >> p & 1]
                if excluded:
                    votes = _votes(x, readers, deadline) if readers else []
                else:
                    votes = _clean_votes(x, readers, msg, deadline)
                    if votes is None:
                        decided = (0, 0)
                        rnd = 1
                        break
        else:
            excluded |= _send_all(x, alive, msg, "agree_send")
            readers = [p for p in alive if not excluded >> p & 1]
            votes = _votes(x, readers, deadline) if readers else []
        heard = set()
        for p, vote in zip(readers, votes):
            if vote is None:
                excluded |= 1 << p
                continue
            heard.add(p)
            kind, _, ex, er = vote
            if kind == wire.DECIDED:
                decided = (ex, er)
                break
            excluded |= ex
            errors |= er
        if decided is None and heard == prev:
            decided = (excluded, errors)  # a clean round: nobody new went missing
        prev = heard
        alive = [p for p in alive if not excluded >> p & 1]
        rnd += 1
    excluded, errors = decided
    final = wire.pack_agree(wire.DECIDED, x.seq, x.attempt, x.sig, rnd, excluded, errors)
    if x.peers:
        _send_all(x, x.peers, final, None)
    return wire.ranks_of(excluded), wire.ranks_of(errors)


_MINE0: Vote = (wire.AGREE, 0, 0, 0)  # a round-0 vote byte-equal to a clean rank's own


def _round0(
    x: Exchange, alive: list[int], names: list[str], mine: bytes, deadline: float
) -> tuple[Optional[list[int]], list[Optional[Vote]]]:
    """Round 0 of a clean rank in one native call: send ``mine``, read every peer's vote, and
    when all equal ``mine`` send the round's DECIDED too (or take that call's results from
    ``x.voted`` when the data phase's last round already ran it). Returns (None, []) when all
    were clean; else the peers that were reached and their votes (None: dead or silent) for
    the general rule."""
    res = x.voted
    if res is None:
        final = wire.pack_agree(wire.DECIDED, x.seq, x.attempt, x.sig, 1, 0, 0)
        _, res = x.mailbox.exchange(
            names, x.tag, mine, deadline - time.monotonic(), x._key, expect=mine, then=final
        )
    readers: list[int] = []
    votes: list[Optional[Vote]] = []
    clean = True
    for p, (status, msg) in zip(alive, res):
        if status == 3:
            readers.append(p)
            votes.append(_MINE0)
            continue
        clean = False
        if status == 4:
            continue  # not reached: excluded by the caller
        readers.append(p)
        votes.append(_vote_of(x, p, msg, deadline) if status == 0 else None)
    return (None, []) if clean else (readers, votes)


def _clean_votes(
    x: Exchange, readers: list[int], mine: bytes, deadline: float
) -> Optional[list[Optional[Vote]]]:
    """Round 0 with nothing to report: None when every peer sent exactly ``mine``, else the
    parsed votes (for the general rule)."""
    names = [x.names[p] for p in readers]
    if x.mailbox.has_back(names, x.tag):
        return [_read_vote(x, p, deadline) for p in readers]
    res = x.mailbox.round(names, x.tag, deadline - time.monotonic(), x._key)
    size = len(mine)
    if all(status == 0 and msg.nbytes == size and msg.data == mine for status, msg in res):
        return None
    return [
        None if status else _vote_of(x, p, msg, deadline) for p, (status, msg) in zip(readers, res)
    ]
