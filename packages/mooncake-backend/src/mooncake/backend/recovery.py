"""Recovery and extension as agreed ops (so every survivor sees the same answer at the same op)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import collectives as algo
from .errors import JoinTimeoutError, RankFailureError

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")


def _check_ranks(pg: MooncakeProcessGroup, ranks: Sequence[int], limit: int) -> list[int]:
    """``ranks`` as ints in [0, limit), in the caller's order (this rank itself counts as a
    member: ready, nothing to admit)."""
    if isinstance(ranks, int):
        raise TypeError(f"ranks must be a sequence of ints, got the int {ranks}")
    out = []
    for r in ranks:
        r = int(r)
        if not 0 <= r < limit:
            raise ValueError(
                f"rank {r} is out of range [0, {limit}) (the group's "
                + ("max_world_size" if not pg.membership.growable else "size")
                + f" is {limit})"
            )
        out.append(r)
    return out


def peer_state(pg: MooncakeProcessGroup, ranks: Sequence[int]) -> list[bool]:
    """Agreed readiness of joiners: True for r when every survivor can reach r's new incarnation,
    or r is an active member (it took part in this op: as the reference's "connected").

    One case needs no communication: every rank asked about was admitted into this group by a
    recovery and the group ran no op since (SGLang recovers WORLD, which admits the joiner into
    every subgroup too, then asks each subgroup, without the joiner taking part). That state is
    agreed, the same on every member, so the local answer is the agreed one."""
    asked = _check_ranks(pg, ranks, pg.membership.capacity)
    m = pg.membership
    members = m.members
    if m.admitted and all(
        r == pg.rank() or (r in members and m.admitted_at.get(r) == pg._seq) for r in asked
    ):
        return [True] * len(asked)
    ranks = sorted(set(asked))  # the op's signature does not depend on the order asked in
    result: list[bool] = []

    def body(x):
        # The membership of this attempt, not of the call: an attempt commits only when every
        # member took part, so a member that died is excluded and the re-run asks about its
        # replacement instead of reporting the dead incarnation as connected.
        current = pg.membership.members
        local = [r in current or pg.membership.peer_ready(r) is not None for r in ranks]
        votes = algo.allgather_bytes(x, json.dumps(local).encode())

        def commit() -> None:
            all_votes = [json.loads(v.decode()) for v in votes.values()]
            result[:] = [all(v[i] for v in all_votes) for i in range(len(ranks))]

        return commit

    pg.run_op("peer_state", tuple(ranks), body)
    by_rank = dict(zip(ranks, result))
    return [by_rank[r] for r in asked]


def recover(
    pg: MooncakeProcessGroup,
    ranks: Sequence[int],
    extent: int,
    timeout: float,
    partial: bool = False,
) -> set[int]:
    """Admit ``ranks`` (replacements or new ranks) at one agreed op; raises ``JoinTimeoutError``
    if they are not all ready in time, or (``partial``) admits those that are and returns them.
    Ranks that are members already are skipped (no communication when all are: the membership
    is agreed, so every member skips the same ones)."""
    ranks = sorted(set(_check_ranks(pg, ranks, pg.membership.capacity)))
    ranks = [r for r in ranks if r not in pg.membership.members]
    if not ranks or not pg.membership.admitted:
        return set()
    deadline = time.monotonic() + timeout
    while True:
        addrs: dict[int, str] = {}
        ok: list[bool] = []

        # run_op returns once committed, so body and commit run within this iteration; the
        # defaults bind this iteration's ``ok`` and ``addrs`` explicitly.
        def body(x, ok=ok, addrs=addrs):
            local = {r: pg.membership.peer_ready(r) for r in ranks}
            late = time.monotonic() > deadline
            votes = algo.allgather_bytes(x, json.dumps({"addrs": local, "late": late}).encode())

            def commit() -> None:
                decoded = [json.loads(v.decode()) for v in votes.values()]
                first = decoded[0]["addrs"]
                ready = [
                    r
                    for r in ranks
                    if all(
                        d["addrs"].get(str(r)) and d["addrs"][str(r)] == first.get(str(r))
                        for d in decoded
                    )
                ]
                late = any(d["late"] for d in decoded)
                ok[:] = [len(ready) == len(ranks), late]
                if ok[0] or (partial and late and ready):
                    addrs.update({r: first[str(r)] for r in ready})
                    # Subgroup ADMITs first: on each connection they then precede this rank's
                    # WORLD ADMIT, and the joiner waits for every survivor's WORLD ADMIT.
                    _admit_subgroups(pg, ready, addrs)
                    pg.membership.admit(ready, addrs, extent)

            return commit

        pg.run_op("recover", tuple(ranks), body)
        if ok and (ok[0] or (partial and ok[1])):
            pg._publish(force=True)
            return set(addrs)
        if ok and ok[1]:
            raise JoinTimeoutError(f"ranks {ranks} did not become ready within {timeout:.1f} s")
        time.sleep(0.01)


def extend(pg: MooncakeProcessGroup, new_size: int, window: float) -> None:
    """``extend_group_size_to``: an agreed op (same ``new_size`` on every member, else
    ``OpMismatchError``) whose commit makes ranks ``[size, new_size)`` part of the group,
    inactive until the next collective admits them (``admit_pending``). Does not wait for them."""
    m = pg.membership

    def body(x):
        algo.barrier(x)

        def commit() -> None:
            m.grow(new_size)
            m.pending_window = window

        return commit

    pg.run_op("extend", (int(new_size),), body)
    pg._publish(force=True)


def admit_pending(pg: MooncakeProcessGroup) -> None:
    """First collective after ``extend_group_size_to`` (every member runs it at the same op):
    agreed readiness rounds until every pending rank is ready or the join window ends; those
    ready then are admitted, the others count as failed (0 in ``active_ranks``; they can come
    back as replacements, see ``recover_ranks``)."""
    m = pg.membership
    ranks, m.pending = list(m.pending), []
    m.admitting = True
    try:
        got = recover(pg, ranks, m.extent, m.pending_window, partial=True)
    finally:
        m.admitting = False
    missing = sorted(set(ranks) - got - m.members)
    if missing:
        m.never_joined |= set(missing)
        log.warning(
            "mooncake: new ranks %s did not join within %.1f s; they count as failed",
            missing,
            m.pending_window,
        )
    m.publish_extent()
    if missing and pg._opts.raise_on_failure:
        raise RankFailureError(f"new ranks {missing} did not join in time", missing)


def rejoin(pg: MooncakeProcessGroup, timeout: float) -> None:
    """An evicted rank comes back in the same process: the process gets a new engine (the
    survivors consider the old incarnation gone), every Mooncake group of the process re-enters
    as a joiner, and this call blocks until the survivors admit ``pg``'s rank with
    ``recover_ranks`` (``JoinTimeoutError`` after ``timeout`` s: the rank stays evicted and may
    call ``rejoin`` again). Groups admitted by the same recovery (subgroups the survivors
    admitted along) are back too; any other group stays evicted until its own admission."""
    from .process_group import _groups
    from .world import renew_world

    if pg._evicted is None:
        raise ValueError(
            f"rejoin: group rank {pg.rank()} is a member of the group (not evicted); rejoin is "
            "for a rank whose ops raised EvictedError"
        )
    if not pg.membership.rejoining:  # a second call after a timeout keeps the new engine
        old = pg._world
        new = renew_world(old)
        for g in list(_groups):
            if g._world is not old:
                continue
            g._world = new
            if g._evicted is None:
                g._evicted = (
                    f"group rank {g.rank()}: its process was evicted from another group and "
                    "re-enters; this group admits it with recover_ranks"
                )
            g.membership.reset_as_joiner()
    groups = [g for g in list(_groups) if g.membership.rejoining]
    pg.membership.wait_admission(timeout)
    pg._evicted = None
    for g in groups:
        if g is not pg and g.membership.poll_admission(timeout=0.0):
            g._evicted = None
    log.info("group rank %d rejoined at op %d", pg.rank(), pg._seq)


def _admit_subgroups(pg: MooncakeProcessGroup, ranks: Sequence[int], addrs: dict[int, str]) -> None:
    """Subgroups of this process that contain a recovered global rank admit it too."""
    from .process_group import _groups

    world_global = {r: pg.membership._global(r) for r in ranks}
    for sub in list(_groups):
        if sub is pg or sub.membership.admitted is False:
            continue
        locals_ = {}
        for r, g in world_global.items():
            if g in sub.membership.global_ranks:
                locals_[sub.membership.global_ranks.index(g)] = addrs[r]
        if locals_:
            sub.membership.admit(sorted(locals_), locals_, sub.membership.extent)
            sub._publish(force=True)
