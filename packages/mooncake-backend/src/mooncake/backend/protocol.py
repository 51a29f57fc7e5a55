"""The op protocol of a Mooncake group, top to bottom: attempt -> data -> agree -> decide.

Every collective (and every recovery step) of a group is one *op*, numbered ``seq`` on every
member alike. An op runs as one or more *attempts*, each among the membership agreed at its start:

1. **Data** (``run_op`` calls the algorithm's ``body``; ``collectives``/``bulk``): bytes move
   among the attempt's members through an ``Exchange``. A peer that dies or misses the op's
   deadline is recorded in ``Exchange.failed``; nothing raises, the algorithm runs to its end and
   writes nothing visible yet (it returns a ``commit``).
2. **Agree** (``agree``): rounds of small all-to-all messages flood what each rank saw: the peers
   it lost, whether it saw a different op (mismatch), and which lost peers it *proved dead*. A
   rank decides at the end of a "clean" round (it heard from exactly the peers it heard from in
   the round before, so nobody went missing in between) and sends DECIDED, which every other rank
   adopts instead of deciding itself. All survivors hold the same decision: (excluded, errors,
   proven). Without failures this is one native call that the data phase's last round already
   ran (``Exchange.exchange(last=True)``).
3. **Decide** (``_decide``), the **membership safety rule**:
   - this rank is among the excluded: it is *evicted* (the others went on without it);
   - ranks saw different ops: the excluded are removed (see below) and ``OpMismatchError``;
   - nothing excluded: ``commit()`` writes the result; the op is done;
   - else the survivors may go on only if every excluded peer is *proven dead*, or the survivors
     are a strict majority of the last agreed membership (peers proven dead not counted). Then
     the excluded are removed and the op re-runs among the survivors (attempt + 1). Otherwise
     this rank is evicted: it cannot tell a stalled peer from the other side of a partition, and
     two sides must never both serve as the group.
4. **Evicted**: the op raises ``EvictedError`` and so does every later op of the group, until the
   process comes back through ``mooncake.pg.rejoin`` (a joiner the survivors admit with
   ``recover_ranks``). An evicted rank never writes a result.

Proof of death (``prove_dead``): the transfer engine saw the peer's process exit (same host: its
liveness lock was released, or its pid is gone), or a TCP connection to the peer's engine endpoint
is *refused*: the peer's host answers and nothing listens on the port any more. A stopped, hung or
partitioned process is never proven dead: its lock stays held, its socket still accepts, or
nothing answers. (A firewall that rejects with a TCP reset would look like a refusal: cut networks
by dropping packets.) Proofs travel in the votes, so every survivor applies the rule to the same
set.

Why no split brain: two disjoint sets of ranks cannot both hold a strict majority of the same
membership, and proofs only name processes that have exited, which can serve on no side. A rank
that resumes after a stall either reads the survivors' DECIDED that excludes it, or finds its
peers gone while their endpoints still accept: it is then at most half of its membership and
evicts itself.

At world 2 a silent peer that is not proven dead leaves one rank out of two, not a majority: the
live rank raises ``EvictedError`` rather than go on alone (a killed peer is proven dead, so the
survivor goes on). Ranks excluded because they missed the deadline while alive learn it from the
DECIDED that every survivor sends to every peer of the attempt, excluded ones included; their
engines also refuse the stale incarnation's reconnects once the heartbeat declared it dead.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from mooncake.transfer import PeerState, RoundStatus

from . import faults, wire
from .errors import EvictedError, OpMismatchError, RankFailureError
from .exchange import Exchange, _FutureMessage
from .mailbox import Message, PeerGone, bytes_of
from .wire import H_KIND, H_SIG

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")

Body = Callable[[Exchange], Callable[[], None]]
Prover = Callable[[set[int]], set[int]]
LANDED, MESSAGE, SEND_FAILED = RoundStatus.LANDED, RoundStatus.MESSAGE, RoundStatus.SEND_FAILED
PROBE_TIMEOUT_S = 0.05
PROBE_RETRY_S = 0.02  # a refused connect answers within a round trip; silence proves nothing


class Decision(NamedTuple):
    excluded: set[int]
    errors: set[int]  # ranks that saw a different op
    proven: set[int]  # excluded ranks proven dead


# ---------------------------------------------------------------------------------------- the op
def run_op(pg: MooncakeProcessGroup, kind: str, sig_parts: tuple, body: Body) -> None:
    """Run one op of ``pg`` through attempts until it commits on this rank (or raises)."""
    if pg._evicted is not None:
        raise EvictedError(pg._evicted)
    m = pg.membership
    if not m.admitted or m.pending:
        pg._ensure_member()
    seq = pg._seq
    pg._seq += 1
    sig = op_signature(pg, kind, sig_parts)
    faults.hit("op_start")
    _attempts(pg, kind, seq, sig, body, None)


def op_signature(pg: MooncakeProcessGroup, kind: str, sig_parts: tuple) -> int:
    """The op's signature (``wire.signature``), cached per group."""
    key = (kind, sig_parts)
    sig = pg._sigs.get(key)
    if sig is None:
        if len(pg._sigs) > 4096:  # many distinct shapes: keep the cache bounded
            pg._sigs.clear()
        sig = pg._sigs[key] = wire.signature(kind, *sig_parts)
    return sig


def new_attempt(pg: MooncakeProcessGroup, seq: int, attempt: int, members: list[int], sig: int):
    """The ``Exchange`` of one attempt of op ``seq`` among ``members``."""
    x = Exchange(
        pg._world.mailbox,
        pg.membership.names,
        pg._tag,
        seq,
        attempt,
        members,
        pg._rank,
        time.monotonic() + pg._op_timeout(),
        sig,
    )
    x.scratch = pg._scratch
    x.grace = pg._grace
    x.max_gap = pg._max_gap
    return x


def resume_op(
    pg: MooncakeProcessGroup, kind: str, body: Body, x: Exchange, commit: Callable[[], None]
) -> None:
    """Go on with op ``x.seq`` whose attempt ``x`` already ran its algorithm (``commit`` is what
    the algorithm returned) outside ``run_op`` (``small_ops``): from the agreement on, as
    ``run_op`` would have; later attempts run ``body``."""
    _attempts(pg, kind, x.seq, x.sig, body, (x, commit))


def _attempts(
    pg: MooncakeProcessGroup, kind: str, seq: int, sig: int, body: Body, first: Optional[tuple]
) -> None:
    """Attempts of op ``seq`` until it commits here (or raises): each runs ``body`` among the
    current members, then the agreement; ``first``: (Exchange, commit) of an attempt 0 whose
    algorithm already ran (``resume_op``)."""
    m = pg.membership
    attempt = 0
    while True:
        if first is not None:
            (x, commit), first = first, None
            members = x.members
        else:
            members = sorted(m.members)
            x = new_attempt(pg, seq, attempt, members, sig)
            commit = None
        try:
            if commit is None:
                commit = body(x)
            if len(members) > 1:
                d = agree(x, pg._grace, lambda ranks: prove_dead(pg, ranks))
            else:
                d = _NOTHING
        finally:
            x.release()
        if pg._debug:
            log.warning(
                "rank %d %s seq %d attempt %d members %s failed %s -> %s",
                pg._rank, kind, seq, attempt, members, sorted(x.failed), d,
            )  # fmt: skip
        if not d.excluded and not d.errors:
            faults.hit("pre_commit")
            commit()
            pg._publish()
            faults.hit("post_commit")
            return
        _decide(pg, kind, seq, members, d, x)
        attempt += 1


_NOTHING = Decision(set(), set(), set())


def _decide(
    pg: MooncakeProcessGroup, kind: str, seq: int, members: list[int], d: Decision, x: Exchange
) -> None:
    """Apply the membership safety rule to an attempt that excluded someone or mismatched;
    returns when the op should re-run among the survivors, raises otherwise."""
    me = pg._rank
    if me in d.excluded:
        survivors = sorted(set(members) - d.excluded)
        _evict(
            pg,
            kind,
            seq,
            f"the survivors (group ranks {survivors}) excluded this rank (group rank {me}): it "
            "missed the op's deadline (stalled, stopped or cut off)",
        )
    if d.excluded and not quorum(members, d.excluded, d.proven):
        silent = sorted(d.excluded - d.proven)
        survivors = sorted(set(members) - d.excluded)
        _evict(
            pg,
            kind,
            seq,
            f"ranks {silent} stopped answering but are not proven dead, and the ranks still "
            f"answering ({survivors}) are not a strict majority of the group's last membership "
            f"{members}: this rank may be on the minority side of a partition, so it does not go "
            "on as the group",
        )
    if d.excluded:
        _notify_evicted(pg, kind, seq, d.excluded - d.proven, sorted(set(members) - d.excluded))
        pg.membership.remove(d.excluded)  # their incarnations never come back (peer_ready)
        pg._publish()
    if d.errors:
        raise OpMismatchError(
            f"mooncake {kind}: ranks disagree on the op (reported by ranks {sorted(d.errors)}): "
            + (x.mismatch or "another rank saw a different op, shape, dtype or reduce op")
        )
    log.warning(
        "mooncake %s seq %d: ranks %s failed (%s); continuing with survivors",
        kind,
        seq,
        sorted(d.excluded),
        "all proven dead" if d.proven >= d.excluded else "majority",
    )
    if pg._opts.raise_on_failure:
        raise RankFailureError(
            f"mooncake {kind}: ranks {sorted(d.excluded)} failed", sorted(d.excluded)
        )


def quorum(members: list[int], excluded: set[int], proven: set[int]) -> bool:
    """The membership safety rule: may ``members - excluded`` go on without ``excluded``?
    Yes when every excluded rank is proven dead, or the survivors are a strict majority of the
    members not proven dead."""
    if excluded <= proven:
        return True
    counted = len(set(members) - (excluded & proven))
    return 2 * (len(members) - len(excluded)) > counted


def _evict(pg: MooncakeProcessGroup, kind: str, seq: int, why: str) -> None:
    name = pg._group_name or pg.membership.group_id
    pg._evicted = (
        f"mooncake {kind} (group {name!r}, op {seq}): {why}. This rank is out of the group: every "
        f"op of the group raises EvictedError until mooncake.pg.rejoin(group) re-enters it as a "
        "joiner, which the survivors admit with get_peer_state / recover_ranks"
    )
    log.error("%s", pg._evicted)
    raise EvictedError(pg._evicted)


def _notify_evicted(
    pg: MooncakeProcessGroup, kind: str, seq: int, ranks: set[int], survivors: list[int]
) -> None:
    """Tell excluded ranks that may still be alive: this engine refuses their incarnation's
    reconnects with the reason (remembered), and closes its connection to each one that is in no
    other group of this process, so it sees the survivors gone on every channel at once (the
    DECIDED on the op channel already said so if it could still read)."""
    from .process_group import _groups

    engine = pg._world.engine
    name = pg._group_name or pg.membership.group_id
    reason = f"evicted from group {name!r} at op {seq} ({kind}) by ranks {survivors}"
    for r in ranks:
        peer = pg.membership.names.get(r)
        if peer is None:
            continue
        elsewhere = any(
            g is not pg and peer in {g.membership.names.get(m) for m in g.membership.members}
            for g in list(_groups)
        )
        try:
            engine.refuse(peer, reason, disconnect=not elsewhere)
        except Exception as e:  # the notice is best effort; the rule does not depend on it
            log.debug("eviction notice to %s failed: %s", peer, e)


# -------------------------------------------------------------------------- proof of death
def prove_dead(pg: MooncakeProcessGroup, ranks: set[int]) -> set[int]:
    """The ranks of ``ranks`` whose current incarnation is proven to have exited (cached: an
    exited process stays exited): the engine saw the process exit (same host), or its endpoint
    refuses connections. A process that is still exiting may hold its listening socket for a
    moment after its connections dropped, so a peer the engine already reports DEAD is probed
    once more after ``PROBE_RETRY_S``."""
    m = pg.membership
    engine = pg._world.engine
    cache = pg._proven_dead
    out = set()
    todo = {}
    for r in ranks:
        name = m.names.get(r)
        if name is None:
            continue
        if name in cache or engine.peer_exited(name):
            cache.add(name)
            out.add(r)
        elif r in m.addrs:
            todo[r] = m.addrs[r]
    if todo:
        dead = probe_dead(todo, PROBE_TIMEOUT_S)
        again = {
            r: a
            for r, a in todo.items()
            if r not in dead and engine.peer_state(m.names[r]) == PeerState.DEAD
        }
        if again:
            time.sleep(PROBE_RETRY_S)
            dead |= {r for r in again if engine.peer_exited(m.names[r])}
            dead |= probe_dead({r: a for r, a in again.items() if r not in dead}, PROBE_TIMEOUT_S)
        for r in dead:
            cache.add(m.names[r])
            out.add(r)
    return out


def probe_dead(addrs: dict[int, str], timeout: float) -> set[int]:
    """Ranks whose engine endpoint (``name|host:port``) refuses a TCP connection within
    ``timeout`` s (all probed at once). Accepted, unreachable or silent: not proven."""
    pending: dict[socket.socket, int] = {}
    dead: set[int] = set()
    for r, addr in addrs.items():
        host, _, port = addr.split("|", 1)[-1].rpartition(":")
        host = host.strip("[]")
        try:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError:
            continue
        s.setblocking(False)
        try:
            err = s.connect_ex((host, int(port)))
        except (OSError, ValueError):
            s.close()
            continue
        if err == errno.ECONNREFUSED:
            dead.add(r)
            s.close()
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            pending[s] = r
        else:
            s.close()
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, ready, _ = select.select([], list(pending), [], left)
        for s in ready:
            r = pending.pop(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
                dead.add(r)
            s.close()
    for s in pending:
        s.close()
    return dead


# ------------------------------------------------------------------------------ agreement
Vote = tuple[int, int, int, int, int]  # (kind, round, excluded mask, errors mask, proven mask)


def agree(x: Exchange, grace: float, prove: Optional[Prover] = None) -> Decision:
    """Run the agreement for attempt ``x`` (see the module docstring, step 2). ``prove(ranks)``
    returns those of ``ranks`` proven dead; it is asked about every peer this rank excludes.

    Why the clean-round rule is enough here: a peer's messages are delivered in order up to its
    death (one stream per peer), so a rank that heard the same peers in two consecutive rounds
    holds every survivor's knowledge of the previous round, and two ranks that are clean in the
    same round hold the same sets. (Round 0 needs every peer: a rank whose data phase already lost
    a peer has not seen what that peer saw, so it waits one more round, where it reads a DECIDED
    or the floods.) A rank that is not clean waits one more round and reads a DECIDED from any
    rank that decided. A peer excluded while still alive receives the DECIDED too. Rounds end at
    the op deadline (plus ``grace``) at the latest, and each round either decides or hears from
    fewer peers, so there are at most n rounds."""
    if x.voted == ():  # round 0 already ran clean in the data phase's last native call
        return _NOTHING
    deadline = max(x.deadline, time.monotonic() + grace)
    excluded = wire.mask_of(x.failed)
    proven = wire.mask_of(prove(set(x.failed))) if prove and x.failed else 0
    probed = excluded  # ranks this rank asked ``prove`` about (once per agreement)
    errors = (1 << x.me) if x.mismatch else 0
    # A rank that stalled between its last data and its round-0 vote (stopped, descheduled) may
    # have been excluded meanwhile by peers whose clean round-0 votes it now reads: it does not
    # decide round 0 on its own, and reads the others' DECIDED in round 1 instead.
    late = time.monotonic() - x.sent_at > x.max_gap
    alive = [p for p in x.peers if not excluded >> p & 1]
    prev = set(x.peers)  # the peers heard in the previous round; before round 0: all of them
    rnd = 0
    decided: Optional[tuple[int, int, int]] = None
    while decided is None:
        msg = wire.pack_agree(wire.AGREE, x.seq, x.attempt, x.sig, rnd, excluded, errors, proven)
        if rnd == 0 and not excluded and not errors and not late and not faults.armed("agree_send"):
            # The common case: every peer's round-0 vote is byte-identical to this rank's own
            # (same attempt, nothing excluded, no mismatch): decided without parsing anything.
            names = [x.names[p] for p in alive]
            if x.voted is not None or not x.mailbox.has_back(names, x.tag):
                readers, votes = _round0(x, alive, names, msg, deadline)
                if readers is None:
                    return _NOTHING  # decided; the DECIDED went out in the same call
                excluded |= wire.mask_of(set(alive) - set(readers))
            else:  # pushed-back messages: send, then read them one by one
                excluded |= _send_all(x, alive, msg, "agree_send")
                readers = [p for p in alive if not excluded >> p & 1]
                if excluded:
                    votes = _votes(x, readers, deadline) if readers else []
                else:
                    votes = _clean_votes(x, readers, msg, deadline)
                    if votes is None:
                        decided = (0, 0, 0)
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
            kind, _, ex, er, pv = vote
            if kind == wire.DECIDED:
                decided = (ex, er, pv)
                break
            excluded |= ex
            errors |= er
            proven |= pv
        if decided is None:
            if prove is not None:  # this rank's own proofs for the peers it newly excluded
                new = wire.ranks_of(excluded & ~probed) - {x.me}
                if new:
                    probed |= wire.mask_of(new)
                    proven |= wire.mask_of(prove(new))
            if heard == prev and not (rnd == 0 and late):
                decided = (excluded, errors, proven)  # a clean round: nobody went missing
        prev = heard
        alive = [p for p in alive if not excluded >> p & 1]
        rnd += 1
    excluded, errors, proven = decided
    final = wire.pack_agree(wire.DECIDED, x.seq, x.attempt, x.sig, rnd, excluded, errors, proven)
    if x.peers:
        _send_all(x, x.peers, final, None)
    return Decision(wire.ranks_of(excluded), wire.ranks_of(errors), wire.ranks_of(proven))


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
    rnd, ex, er, pv = wire.unpack_agree(bytes_of(msg))
    if h[H_SIG] != x.sig:
        er |= 1 << src
    return kind, rnd, ex, er, pv


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
        _vote_of(x, p, msg, deadline) if status is MESSAGE else None
        for p, (status, msg) in zip(ranks, res)
    ]


_MINE0: Vote = (wire.AGREE, 0, 0, 0, 0)  # a round-0 vote byte-equal to a clean rank's own


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
        if status is LANDED:
            readers.append(p)
            votes.append(_MINE0)
            continue
        clean = False
        if status is SEND_FAILED:
            continue  # not reached: excluded by the caller
        readers.append(p)
        votes.append(_vote_of(x, p, msg, deadline) if status is MESSAGE else None)
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
    if all(status is MESSAGE and msg.nbytes == size and msg.data == mine for status, msg in res):
        return None
    return [
        _vote_of(x, p, msg, deadline) if status is MESSAGE else None
        for p, (status, msg) in zip(readers, res)
    ]
