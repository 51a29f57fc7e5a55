"""Where each logical expert lives: the physical-slot map that the balancer produces.

Notation (docs/contracts/ep.md): ``R`` ranks, ``S`` physical slots per rank, ``P = R * S`` physical
slots in all, ``E`` logical experts (what the router picks). Physical slot ``p`` lives on rank
``p // S`` as local expert ``p % S``; that is exactly the layout ``Buffer.dispatch`` uses when it is
called with ``num_experts = P``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _as_int_list(value: torch.Tensor | Sequence[int], name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
        return [int(v) for v in value.reshape(-1).tolist()]
    try:
        return [int(v) for v in value]
    except TypeError as exc:
        raise TypeError(
            f"{name} must be a tensor or a sequence of ints, got {type(value).__name__}"
        ) from exc


def check_active_ranks(
    active_ranks: torch.Tensor | Sequence[int] | None, num_ranks: int
) -> list[bool]:
    """``active_ranks`` (int ``[R]``, 1 alive / 0 failed; None = all alive) as a list of bools."""
    if active_ranks is None:
        return [True] * num_ranks
    values = _as_int_list(active_ranks, "active_ranks")
    if len(values) != num_ranks:
        raise ValueError(f"active_ranks has {len(values)} entries, expected num_ranks={num_ranks}")
    if any(v not in (0, 1) for v in values):
        raise ValueError(f"active_ranks entries must be 0 or 1, got {values}")
    return [v == 1 for v in values]


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """A physical-to-logical expert map for one MoE layer.

    Attributes:
        phy2log: int64 ``[P]``; the logical expert held by each physical slot, ``-1`` = empty slot
            (a failed rank's slots, or slots nobody needs).
        log2phy: int64 ``[E, max_replicas]``; the physical slots of each logical expert in ascending
            order, padded with ``-1``.
        logcnt: int64 ``[E]``; the number of replicas of each logical expert (0 = unavailable).
        num_ranks: ``R``.
        slots_per_rank: ``S``.
        policy: how the balancer built it (``"global"``, ``"hierarchical"``, ``"given"``), for logs.

    Build one with :func:`mooncake.ep.eplb.rebalance_experts` or :meth:`from_phy2log`.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    num_ranks: int
    slots_per_rank: int
    policy: str = "given"

    @classmethod
    def from_phy2log(
        cls,
        phy2log: torch.Tensor | Sequence[int],
        num_logical: int,
        num_ranks: int,
        slots_per_rank: int,
        policy: str = "given",
    ) -> ExpertPlacement:
        """Build the placement (and its inverse maps) from a physical-to-logical list."""
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        if slots_per_rank < 1:
            raise ValueError(f"slots_per_rank must be >= 1, got {slots_per_rank}")
        if num_logical < 1:
            raise ValueError(f"num_logical must be >= 1, got {num_logical}")
        values = _as_int_list(phy2log, "phy2log")
        if len(values) != num_ranks * slots_per_rank:
            raise ValueError(
                f"phy2log has {len(values)} entries, expected num_ranks*slots_per_rank="
                f"{num_ranks * slots_per_rank}"
            )
        bad = [v for v in values if v < -1 or v >= num_logical]
        if bad:
            raise ValueError(f"phy2log entries must be in [-1, {num_logical}), got {bad[:8]}")
        replicas: list[list[int]] = [[] for _ in range(num_logical)]
        for slot, expert in enumerate(values):
            if expert >= 0:
                replicas[expert].append(slot)
        width = max(1, max(len(r) for r in replicas))
        log2phy = torch.full((num_logical, width), -1, dtype=torch.int64, device="cpu")
        for expert, slots in enumerate(replicas):
            if slots:
                log2phy[expert, : len(slots)] = torch.tensor(slots, dtype=torch.int64, device="cpu")
        return cls(
            phy2log=torch.tensor(values, dtype=torch.int64, device="cpu"),
            log2phy=log2phy,
            logcnt=torch.tensor([len(r) for r in replicas], dtype=torch.int64, device="cpu"),
            num_ranks=num_ranks,
            slots_per_rank=slots_per_rank,
            policy=policy,
        )

    @property
    def num_logical(self) -> int:
        return int(self.logcnt.numel())

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.numel())

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def local_experts(self, rank: int) -> list[int]:
        """Logical expert of each local slot of ``rank`` (``-1`` = empty), length ``S``."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be in [0, {self.num_ranks}), got {rank}")
        s = self.slots_per_rank
        return [int(v) for v in self.phy2log[rank * s : (rank + 1) * s].tolist()]

    def replica_slots(self, expert: int) -> list[int]:
        """Physical slots holding ``expert``, ascending."""
        if not 0 <= expert < self.num_logical:
            raise ValueError(f"expert must be in [0, {self.num_logical}), got {expert}")
        return [int(v) for v in self.log2phy[expert].tolist() if v >= 0]

    def unavailable_experts(self) -> list[int]:
        """Logical experts with no replica at all, ascending."""
        return [e for e, c in enumerate(self.logcnt.tolist()) if c == 0]

    def with_only_slots(self, keep: torch.Tensor | Sequence[bool]) -> ExpertPlacement:
        """The same placement with the slots where ``keep`` is false emptied (``-1``)."""
        keep_list = [bool(v) for v in (keep.tolist() if isinstance(keep, torch.Tensor) else keep)]
        if len(keep_list) != self.num_physical:
            raise ValueError(f"keep has {len(keep_list)} entries, expected {self.num_physical}")
        values = [e if k else -1 for e, k in zip(self.phy2log.tolist(), keep_list)]
        return ExpertPlacement.from_phy2log(
            values, self.num_logical, self.num_ranks, self.slots_per_rank, self.policy
        )

    def rank_loads(self, expert_load: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """float64 ``[R]``: each rank's share of ``expert_load`` (``[E]``) when every logical
        expert's load is split evenly over its replicas (what the routing helper does)."""
        load = torch.as_tensor(
            expert_load, dtype=torch.float64, device=self.phy2log.device
        ).reshape(-1)
        if load.numel() != self.num_logical:
            raise ValueError(f"expert_load has {load.numel()} entries, expected {self.num_logical}")
        valid = self.phy2log >= 0
        experts = self.phy2log.clamp(min=0)
        per_slot = torch.where(
            valid, load[experts] / self.logcnt[experts].clamp(min=1).to(torch.float64), 0.0
        )
        return per_slot.reshape(self.num_ranks, self.slots_per_rank).sum(dim=1)

    def same_as(self, other: ExpertPlacement) -> bool:
        return (
            self.num_ranks == other.num_ranks
            and self.slots_per_rank == other.slots_per_rank
            and self.num_logical == other.num_logical
            and torch.equal(self.phy2log, other.phy2log)
        )

    def __repr__(self) -> str:
        s = self.slots_per_rank
        ranks = [self.phy2log[r * s : (r + 1) * s].tolist() for r in range(self.num_ranks)]
        return (
            f"ExpertPlacement(policy={self.policy!r}, E={self.num_logical}, R={self.num_ranks}, "
            f"S={s}, ranks={ranks}, unavailable={self.unavailable_experts()})"
        )


def logical_load_from_physical(
    physical_load: torch.Tensor, placement: ExpertPlacement
) -> torch.Tensor:
    """Sum per-slot load (``[P]`` or ``[R, S]``, e.g. every rank's
    ``cumulative_local_expert_recv_stats`` gathered) into per-logical-expert load, float64 ``[E]``.
    Empty slots are ignored."""
    load = physical_load.reshape(-1).to(torch.float64).cpu()
    if load.numel() != placement.num_physical:
        raise ValueError(
            f"physical_load has {load.numel()} entries, expected {placement.num_physical}"
        )
    valid = placement.phy2log >= 0
    out = torch.zeros(placement.num_logical, dtype=torch.float64, device="cpu")
    out.index_add_(0, placement.phy2log[valid], load[valid])
    return out
