"""Recovery and extension as agreed ops (so every survivor sees the same answer at the same op)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import collectives as algo
from .errors import JoinTimeoutError

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup


def _check_ranks(pg: MooncakeProcessGroup, ranks: Sequence[int], limit: int) -> list[int]:
    out = []
    for r in ranks:
        r = int(r)
        if not 0 <= r < limit:
            raise ValueError(f"rank {r} is out of range [0, {limit})")
        if r == pg.rank():
            raise ValueError(f"rank {r} is this process itself")
        out.append(r)
    return sorted(set(out))


def peer_state(pg: MooncakeProcessGroup, ranks: Sequence[int]) -> list[bool]:
    """Agreed readiness of joiners: True for r when every survivor can reach r's new incarnation."""
    ranks = _check_ranks(pg, ranks, pg.membership.capacity)
    result: list[bool] = []

    def body(x):
        local = [pg.membership.peer_ready(r) is not None for r in ranks]
        votes = algo.allgather_bytes(x, json.dumps(local).encode())

        def commit() -> None:
            all_votes = [json.loads(v.decode()) for v in votes.values()]
            result[:] = [all(v[i] for v in all_votes) for i in range(len(ranks))]

        return commit

    pg.run_op("peer_state", tuple(ranks), body)
    return result


def recover(pg: MooncakeProcessGroup, ranks: Sequence[int], extent: int, timeout: float) -> None:
    """Admit ``ranks`` (replacements or new ranks) at one agreed op; raises if not ready in time."""
    ranks = _check_ranks(pg, ranks, pg.membership.capacity)
    deadline = time.monotonic() + timeout
    while True:
        addrs: dict[int, str] = {}
        ok: list[bool] = []

        def body(x):
            local = {r: pg.membership.peer_ready(r) for r in ranks}
            late = time.monotonic() > deadline
            votes = algo.allgather_bytes(x, json.dumps({"addrs": local, "late": late}).encode())

            def commit() -> None:
                decoded = [json.loads(v.decode()) for v in votes.values()]
                first = decoded[0]["addrs"]
                ready = all(
                    all(
                        d["addrs"].get(str(r)) and d["addrs"][str(r)] == first.get(str(r))
                        for r in ranks
                    )
                    for d in decoded
                )
                ok[:] = [ready, any(d["late"] for d in decoded)]
                if ready:
                    addrs.update({r: first[str(r)] for r in ranks})
                    # Subgroup ADMITs first: on each connection they then precede this rank's
                    # WORLD ADMIT, and the joiner waits for every survivor's WORLD ADMIT.
                    _admit_subgroups(pg, ranks, addrs)
                    pg.membership.admit(ranks, addrs, extent)

            return commit

        pg.run_op("recover", tuple(ranks), body)
        if ok and ok[0]:
            pg._publish(force=True)
            return
        if ok and ok[1]:
            raise JoinTimeoutError(f"ranks {ranks} did not become ready within {timeout:.1f} s")
        time.sleep(0.01)


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
