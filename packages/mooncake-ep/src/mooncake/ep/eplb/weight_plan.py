"""Which physical slot needs which logical expert's weights from where, when the placement changes,
and an executor for that plan over ``torch.distributed`` point-to-point ops.

A plan is computed locally and identically on every rank from (old placement, new placement,
ranks whose old slots hold valid weights), so it needs no communication to agree on.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mooncake.ep.eplb.placement import ExpertPlacement, check_active_ranks

logger = logging.getLogger("mooncake.ep")

KEEP = "keep"
LOCAL = "local"  # copy from another slot of the same rank
P2P = "p2p"  # receive from a slot on another rank
STORAGE = "storage"  # load from the checkpoint (no live rank holds the expert)


@dataclass(frozen=True)
class WeightMove:
    """One slot's new content. ``src_slot``/``src_rank`` are ``-1`` for ``storage``."""

    dst_slot: int
    dst_rank: int
    expert: int
    kind: str
    src_slot: int = -1
    src_rank: int = -1


@dataclass(frozen=True)
class WeightMovePlan:
    """The moves (slots whose content changes, ascending ``dst_slot``) and the slots kept.

    Attributes:
        moves: every slot that needs new weights (``local``, ``p2p`` or ``storage``).
        kept: slots already holding the right expert.
        lost_experts: experts the new placement needs that no valid source holds, when storage
            loads were not allowed; their slots are not in ``moves``.
        slots_per_rank: ``S``.
    """

    moves: tuple[WeightMove, ...]
    kept: tuple[int, ...]
    lost_experts: tuple[int, ...]
    slots_per_rank: int

    def count(self, kind: str) -> int:
        return sum(1 for m in self.moves if m.kind == kind)

    def sends_from(self, rank: int) -> list[WeightMove]:
        return [m for m in self.moves if m.kind == P2P and m.src_rank == rank]

    def receives_to(self, rank: int) -> list[WeightMove]:
        return [m for m in self.moves if m.kind == P2P and m.dst_rank == rank]

    def summary(self) -> str:
        return (
            f"{self.count(P2P)} p2p, {self.count(LOCAL)} local, {self.count(STORAGE)} storage, "
            f"{len(self.kept)} kept"
            + (f", lost {list(self.lost_experts)}" if self.lost_experts else "")
        )


def plan_weight_moves(
    old: ExpertPlacement,
    new: ExpertPlacement,
    source_ranks: torch.Tensor | Sequence[int] | None = None,
    allow_storage: bool = True,
) -> WeightMovePlan:
    """Plan the weight moves from ``old`` to ``new``.

    Args:
        old: what the slots hold now (slots on ranks outside ``source_ranks`` are ignored).
        new: the target placement (it has no slots on failed ranks).
        source_ranks: int ``[R]``, 1 where the rank is alive and its slots hold ``old``'s weights
            (0 for failed ranks and for a replacement process that has not received weights yet).
            None = all ranks.
        allow_storage: an expert that no valid source holds is loaded from the checkpoint
            (``storage`` move); if False it is reported in ``lost_experts`` instead.

    Per destination slot (ascending): keep it if it already holds the expert; else copy from a
    slot of the same rank holding it; else receive it from the valid rank that has been asked to
    send the fewest times so far (ties: lowest slot), spreading the sends; else storage.
    """
    if (old.num_logical, old.num_ranks, old.slots_per_rank) != (
        new.num_logical,
        new.num_ranks,
        new.slots_per_rank,
    ):
        raise ValueError(
            f"old and new placements differ in (E, R, S): ({old.num_logical}, {old.num_ranks}, "
            f"{old.slots_per_rank}) vs ({new.num_logical}, {new.num_ranks}, {new.slots_per_rank})"
        )
    valid = check_active_ranks(source_ranks, old.num_ranks)
    s = old.slots_per_rank
    old_map = old.phy2log.tolist()
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old_map):
        if expert >= 0 and valid[slot // s]:
            holders.setdefault(expert, []).append(slot)
    sends_per_rank = [0] * old.num_ranks
    moves: list[WeightMove] = []
    kept: list[int] = []
    lost: set[int] = set()
    for slot, expert in enumerate(new.phy2log.tolist()):
        if expert < 0:
            continue
        rank = slot // s
        if valid[rank] and old_map[slot] == expert:
            kept.append(slot)
            continue
        sources = holders.get(expert, [])
        same_rank = [src for src in sources if src // s == rank]
        if same_rank:
            moves.append(WeightMove(slot, rank, expert, LOCAL, same_rank[0], rank))
        elif sources:
            src = min(sources, key=lambda p: (sends_per_rank[p // s], p))
            sends_per_rank[src // s] += 1
            moves.append(WeightMove(slot, rank, expert, P2P, src, src // s))
        elif allow_storage:
            moves.append(WeightMove(slot, rank, expert, STORAGE))
        else:
            lost.add(expert)
    return WeightMovePlan(tuple(moves), tuple(kept), tuple(sorted(lost)), s)


class WeightMoveError(RuntimeError):
    """Point-to-point weight transfers did not complete; ``failed_peers`` lists the peers."""

    def __init__(self, message: str, failed_peers: list[int]):
        super().__init__(message)
        self.failed_peers = failed_peers


@dataclass(frozen=True)
class WeightMoveResult:
    sent_bytes: int
    received_bytes: int
    local_copies: int
    storage_loads: int
    seconds: float


def _wait(work: Any, deadline: float) -> None:
    """``work.wait()`` bounded by ``deadline`` (``time.monotonic()``). Backends whose works cannot
    wait with a timeout (Python process groups wrap a future) are polled through the future."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("weight transfer deadline passed")
    try:
        if work.wait(timeout=datetime.timedelta(seconds=remaining)) is False:
            raise TimeoutError(f"weight transfer not done within {remaining:.1f} s")
        return
    except RuntimeError as exc:
        if "not implemented" not in str(exc):
            raise
    future = work.get_future()
    pause = 0.0002
    while not future.done():  # spin briefly, then back off: the peer may need this core
        if time.monotonic() > deadline:
            raise TimeoutError("weight transfer deadline passed")
        time.sleep(pause)
        pause = min(2 * pause, 0.005)
    work.wait()  # raises the op's error, if it failed


def execute_weight_moves(
    plan: WeightMovePlan,
    rank: int,
    slot_weights: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    load_from_storage: Callable[[int], Sequence[torch.Tensor]] | None = None,
    timeout_s: float = 30.0,
) -> WeightMoveResult:
    """Run this rank's part of ``plan``; every rank of the group that sends or receives must call
    it with the same plan (ranks with nothing to do may skip it).

    Args:
        plan: from :func:`plan_weight_moves`, identical on every rank.
        rank: this process's rank in ``group`` (the plan's rank numbering).
        slot_weights: this rank's expert parameters, each ``[S, ...]`` (local slot first, e.g.
            ``w13 [S, 2I, H]`` and ``w2 [S, H, I]``); updated in place, so pointers captured by
            CUDA graphs stay valid.
        group: the process group (None = default group); p2p peers are translated to global ranks.
        load_from_storage: ``expert -> tensors shaped like slot_weights[i][0]``, required when the
            plan has ``storage`` moves for this rank.
        timeout_s: deadline in seconds for all transfers of this call.

    Every source is read before any slot is written (a slot may be both a source and a
    destination). Per peer and parameter one message carries all moved slots, in plan order.

    Raises:
        WeightMoveError: a transfer failed or missed the deadline; slots whose transfer failed
            are not written (the others are), and ``failed_peers`` names the peers.
        ValueError: bad arguments (shapes, missing ``load_from_storage``).
    """
    s = plan.slots_per_rank
    if not slot_weights:
        raise ValueError("slot_weights must hold at least one tensor")
    for i, w in enumerate(slot_weights):
        if w.dim() < 1 or w.shape[0] != s:
            raise ValueError(f"slot_weights[{i}] must be [S={s}, ...], got shape {tuple(w.shape)}")
    start = time.monotonic()
    outgoing: dict[int, list[WeightMove]] = {}
    incoming: dict[int, list[WeightMove]] = {}
    for move in plan.moves:
        if move.kind == P2P and move.src_rank == rank:
            outgoing.setdefault(move.dst_rank, []).append(move)
        if move.kind == P2P and move.dst_rank == rank:
            incoming.setdefault(move.src_rank, []).append(move)
    local = [m for m in plan.moves if m.kind == LOCAL and m.dst_rank == rank]
    storage = [m for m in plan.moves if m.kind == STORAGE and m.dst_rank == rank]
    if storage and load_from_storage is None:
        raise ValueError(
            f"plan loads experts {[m.expert for m in storage]} from storage on rank {rank}, but "
            "load_from_storage is None"
        )

    # Snapshot every source before any slot is overwritten.
    send_bufs = {
        (peer, i): torch.stack([w[m.src_slot % s] for m in moves]).contiguous()
        for peer, moves in outgoing.items()
        for i, w in enumerate(slot_weights)
    }
    local_copies = [[w[m.src_slot % s].clone() for w in slot_weights] for m in local]
    recv_bufs = {
        (peer, i): torch.empty((len(moves), *w.shape[1:]), dtype=w.dtype, device=w.device)
        for peer, moves in incoming.items()
        for i, w in enumerate(slot_weights)
    }

    def global_rank(r: int) -> int:
        if group is None or group is dist.group.WORLD:
            return r
        return dist.get_global_rank(group, r)

    ops = []
    for peer in sorted(set(outgoing) | set(incoming)):
        for i in range(len(slot_weights)):
            if (peer, i) in send_bufs:
                ops.append(
                    dist.P2POp(dist.isend, send_bufs[(peer, i)], global_rank(peer), group, tag=i)
                )
            if (peer, i) in recv_bufs:
                ops.append(
                    dist.P2POp(dist.irecv, recv_bufs[(peer, i)], global_rank(peer), group, tag=i)
                )
    failed: set[int] = set()
    if ops:
        works = dist.batch_isend_irecv(ops)
        deadline = start + timeout_s
        for op, work in zip(ops, works):
            try:
                _wait(work, deadline)
            except (RuntimeError, TimeoutError) as exc:  # a dead or late peer
                logger.warning("eplb: weight transfer with rank %s failed: %s", op.peer, exc)
                failed.add(op.peer)

    for move, tensors in zip(local, local_copies):
        for w, t in zip(slot_weights, tensors):
            w[move.dst_slot % s].copy_(t)
    for move in storage:
        tensors = load_from_storage(move.expert)  # type: ignore[misc]
        for i, (w, t) in enumerate(zip(slot_weights, tensors)):
            if tuple(t.shape) != tuple(w.shape[1:]):
                raise ValueError(
                    f"load_from_storage({move.expert})[{i}] has shape {tuple(t.shape)}, expected "
                    f"{tuple(w.shape[1:])}"
                )
            w[move.dst_slot % s].copy_(t)
    failed_group_ranks = [p for p in set(incoming) | set(outgoing) if global_rank(p) in failed]
    for peer, moves in incoming.items():
        if peer in failed_group_ranks:
            continue
        for i, w in enumerate(slot_weights):
            for j, move in enumerate(moves):
                w[move.dst_slot % s].copy_(recv_bufs[(peer, i)][j])
    if failed_group_ranks:
        raise WeightMoveError(
            f"weight transfers with ranks {sorted(failed_group_ranks)} failed or missed the "
            f"{timeout_s} s deadline",
            sorted(failed_group_ranks),
        )
    return WeightMoveResult(
        sent_bytes=sum(t.numel() * t.element_size() for t in send_bufs.values()),
        received_bytes=sum(t.numel() * t.element_size() for t in recv_bufs.values()),
        local_copies=len(local),
        storage_loads=len(storage),
        seconds=time.monotonic() - start,
    )
