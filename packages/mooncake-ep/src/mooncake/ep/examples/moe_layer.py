"""A small MoE layer on Mooncake EP that keeps serving when ranks die, through EPLB.

Router (softmax top-k over ``E`` logical experts) -> :func:`route_to_physical` (live replicas) ->
``Buffer.dispatch`` (``num_experts = R * S`` physical slots) -> expert MLPs (ReGLU) ->
``Buffer.combine``.
When the agreed membership changes, every member recomputes the same placement
(:func:`rebalance_experts`, no extra agreement needed: same inputs, deterministic), and the weights
move with :func:`execute_weight_moves` (point-to-point) or are reloaded from the checkpoint.

Exactness: the expert MLP computes every row with element-wise fp32 ops in a fixed order (no matmul,
whose blocking depends on the batch size), so a token's expert output does not depend on which
replica, batch or rank computed it; ``combine`` sums over ``k`` in increasing order in fp32. The
output is then bit-identical (BF16) to :func:`reference_output`, a local computation with all
experts, whatever the placement, as long as no contribution is lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from mooncake.ep.eplb import (
    ExpertPlacement,
    WeightMoveError,
    execute_weight_moves,
    plan_weight_moves,
    rebalance_experts,
    route_to_physical,
)

logger = logging.getLogger("mooncake.ep")

# torch >= 2.13 names it all_gather_single; older releases only have all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class MoEConfig:
    """Shapes of the example layer. ``num_experts`` logical experts live in
    ``slots_per_rank`` physical slots on each rank; ``tokens_per_rank`` is ``T``."""

    hidden: int = 128
    intermediate: int = 64
    num_experts: int = 16
    slots_per_rank: int = 6
    top_k: int = 2
    tokens_per_rank: int = 32
    seed: int = 0
    timeout_us: int = 5_000_000
    min_replicas: int = 1
    rebalance_every: int = (
        0  # also rebalance by load every this many passes (0 = only on membership change)
    )
    min_gain: float = 0.05  # a load-driven rebalance must lower the max rank load by this fraction

    def __post_init__(self) -> None:
        for name in (
            "hidden",
            "intermediate",
            "num_experts",
            "slots_per_rank",
            "top_k",
            "tokens_per_rank",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be an int >= 1, got {value!r}")
        if self.hidden % 128:
            raise ValueError(
                f"MoEConfig.hidden must be a multiple of 128 (EP limit), got {self.hidden}"
            )
        if not isinstance(self.rebalance_every, int) or self.rebalance_every < 0:
            raise ValueError(
                f"MoEConfig.rebalance_every must be an int >= 0, got {self.rebalance_every!r}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")


class ExpertCheckpoint:
    """The model's weights, generated from a seed: stands in for reading a checkpoint, and is what a
    rank reloads when no live rank holds an expert any more."""

    def __init__(self, config: MoEConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)

    def expert(self, expert: int) -> list[torch.Tensor]:
        """``[w13 bf16 [2I, H], w2 bf16 [H, I]]`` of logical ``expert``."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 100_003 + 17 + expert)
        w13 = torch.randn(2 * c.intermediate, c.hidden, generator=g, device="cpu") * c.hidden**-0.5
        w2 = torch.randn(c.hidden, c.intermediate, generator=g, device="cpu") * c.intermediate**-0.5
        return [w13.to(self.device, torch.bfloat16), w2.to(self.device, torch.bfloat16)]

    def router(self) -> torch.Tensor:
        """fp32 ``[E, H]`` router weight."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 100_003 + 1)
        return torch.randn(c.num_experts, c.hidden, generator=g, device="cpu").to(self.device)


def _row_exact_matmul(x: torch.Tensor, w: torch.Tensor, block: int = 16) -> torch.Tensor:
    """``x [..., M, K] @ w[..., O, K]^T`` in fp32 without a matmul kernel (whose blocking depends on
    ``M``): per block of ``K``, element-wise products reduced by a pairwise tree of element-wise
    adds, then added to the accumulator in block order. Every output element is the same sequence
    of IEEE operations whatever ``M``, the batch, the thread count or the device."""
    acc = None
    for k0 in range(0, x.shape[-1], block):
        p = x[..., k0 : k0 + block].unsqueeze(-2) * w[..., k0 : k0 + block].unsqueeze(
            -3
        )  # [..., M, O, b]
        while p.shape[-1] > 1:
            if p.shape[-1] % 2:
                p = torch.nn.functional.pad(p, (0, 1))
            half = p.shape[-1] // 2
            p = p[..., :half] + p[..., half:]
        acc = p[..., 0] if acc is None else acc + p[..., 0]
    assert acc is not None
    return acc


def expert_mlp(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, rows_per_chunk: int = 64
) -> torch.Tensor:
    """ReGLU expert MLPs, one per slot: ``(relu(x W_gate^T) * (x W_up^T)) W_2^T``.

    Args:
        x: bf16 ``[S, M, H]`` (rows of each slot); w13: bf16 ``[S, 2I, H]``; w2: bf16 ``[S, H, I]``.
        rows_per_chunk: rows per step (bounds the ``[S, rows, 2I, H]`` fp32 temporary).

    Returns:
        bf16 ``[S, M, H]``. Each row is computed alone with fp32 element-wise operations in a fixed
        order, so it is bit-identical for any ``M``, batch, replica or device.
    """
    w13f, w2f = w13.float(), w2.float()
    inter = w13.shape[1] // 2
    outs = []
    for start in range(0, x.shape[1], rows_per_chunk):
        gate_up = _row_exact_matmul(x[:, start : start + rows_per_chunk].float(), w13f)
        act = torch.relu(gate_up[..., :inter]) * gate_up[..., inter:]
        outs.append(_row_exact_matmul(act, w2f))
    if not outs:
        return torch.empty(x.shape[0], 0, w2.shape[1], dtype=torch.bfloat16, device=x.device)
    return torch.cat(outs, dim=1).to(torch.bfloat16)


def route_tokens(
    x: torch.Tensor, router: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k router: ``(topk_idx int64 [N, K], topk_weights float32 [N, K])`` (weights
    renormalised over the k chosen experts)."""
    probs = torch.softmax(x.float() @ router.t(), dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    return idx, (weights / weights.sum(dim=-1, keepdim=True)).float()


class ReferenceMoE:
    """The layer computed locally with every expert (what the distributed output must equal)."""

    def __init__(self, checkpoint: ExpertCheckpoint) -> None:
        weights = [checkpoint.expert(e) for e in range(checkpoint.config.num_experts)]
        self.w13 = torch.stack([w[0] for w in weights])
        self.w2 = torch.stack([w[1] for w in weights])

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 ``[E, N, H]``: every expert applied to every token."""
        num_experts = self.w13.shape[0]
        return expert_mlp(x.unsqueeze(0).expand(num_experts, -1, -1), self.w13, self.w2)

    @staticmethod
    def combine(
        outs: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """bf16 ``[N, H]``, accumulated in fp32 in increasing ``k`` as ``combine`` does;
        ``dropped`` (bool ``[N, K]``) leaves contributions out."""
        num_tokens, hidden = outs.shape[1], outs.shape[2]
        acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=outs.device)
        rows = torch.arange(num_tokens, device=outs.device)
        for k in range(topk_idx.shape[1]):
            use = topk_idx[:, k] >= 0
            if dropped is not None:
                use &= ~dropped[:, k].to(outs.device)
            contrib = outs[topk_idx[:, k].clamp(min=0), rows].float() * topk_weights[:, k : k + 1]
            acc = torch.where(use.unsqueeze(1), acc + contrib, acc)
        return acc.to(torch.bfloat16)


def reference_output(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    checkpoint: ExpertCheckpoint,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's output computed locally with every expert: bf16 ``[N, H]``; ``dropped``
    (bool ``[N, K]``) leaves those contributions out."""
    ref = ReferenceMoE(checkpoint)
    return ref.combine(ref.expert_outputs(x), topk_idx, topk_weights, dropped)


@dataclass
class RebalanceReport:
    active_ranks: list[int]
    plan: str
    unavailable_experts: list[int]
    seconds: float
    failed_peers: list[int] = field(default_factory=list)


@dataclass
class ForwardReport:
    """What one forward pass did.

    Attributes:
        active_ranks: the agreed membership the pass started with.
        active_after: membership after dispatch and combine (0 where a rank failed during the pass).
        topk_idx, topk_weights: the router's logical choice ``[N, K]``.
        lost: bool ``[N, K]``: contributions missing from the output (expert had no live replica,
            or its rank failed during the pass).
        unavailable_experts: logical experts of the lost contributions, ascending.
        rebalance: set when the pass started with a rebalance.
    """

    active_ranks: list[int]
    active_after: list[int]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    lost: torch.Tensor
    unavailable_experts: list[int]
    rebalance: RebalanceReport | None = None

    @property
    def lost_tokens(self) -> int:
        return int(self.lost.any(dim=1).sum())


class FaultTolerantMoELayer:
    """One MoE layer over a Mooncake EP ``Buffer`` with expert replication and rebalancing.

    Every member of ``group`` calls :meth:`forward` in step (it runs collectives). After the
    backend admitted replacements (``pg.recover_ranks``) and ``buffer.update_ep_member()`` ran,
    survivors call :meth:`reset_membership`; a replacement builds a new layer with
    ``has_weights=False`` and receives its experts in the next :meth:`forward`.

    Args:
        config: shapes.
        group: the process group (``"mooncake-cpu"`` / ``"mooncake"``; gloo works without faults).
        buffer: a ``mooncake.mooncake_ep_buffer.Buffer`` over ``group``.
        checkpoint: where lost experts are reloaded from; None = weights live only on ranks, and an
            expert whose every replica died stays unavailable (reported).
        has_weights: False for a replacement process (its slots hold nothing yet).
        passes: the pass count to start from (a replacement takes the survivors' count, so that
            ``rebalance_every`` stays in step).
        device: where tokens, weights and EP tensors live.
        fault_hook: called as ``fault_hook("after_dispatch")`` inside each pass (fault injection).
    """

    def __init__(
        self,
        config: MoEConfig,
        group: dist.ProcessGroup,
        buffer: Any,
        checkpoint: ExpertCheckpoint | None = None,
        *,
        has_weights: bool = True,
        passes: int = 0,
        device: torch.device | str = "cpu",
        fault_hook: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.group = group
        self.buffer = buffer
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.fault_hook = fault_hook
        self.rank = group.rank()
        self.num_ranks = group.size()
        c = config
        s = c.slots_per_rank
        self.router = ExpertCheckpoint(c, self.device).router()
        self.w13 = torch.zeros(
            s, 2 * c.intermediate, c.hidden, dtype=torch.bfloat16, device=self.device
        )
        self.w2 = torch.zeros(s, c.hidden, c.intermediate, dtype=torch.bfloat16, device=self.device)
        self.recv_stats = torch.zeros(s, dtype=torch.int32, device=self.device)
        # logical choices made on this rank, summed over ranks when rebalancing
        self.routed_load = torch.zeros(c.num_experts, dtype=torch.int64, device="cpu")
        self._seen_active = torch.ones(self.num_ranks, dtype=torch.int32, device="cpu")
        self.held = [-1] * s  # logical expert whose weights each local slot holds
        self.placement: ExpertPlacement | None = None  # routing placement (slots with weights)
        self.placement_active: list[int] | None = None
        # forward passes run by this layer's group (the same count on every member)
        self.passes = passes
        if has_weights:
            # Initial placement: the same on every rank without communication (uniform load).
            initial = rebalance_experts(
                torch.ones(c.num_experts, device="cpu"),
                self.num_ranks,
                s,
                min_replicas=c.min_replicas,
            )
            source = checkpoint or ExpertCheckpoint(c, self.device)
            for slot, expert in enumerate(initial.local_experts(self.rank)):
                if expert >= 0:
                    self.w13[slot], self.w2[slot] = source.expert(expert)
            self.held = initial.local_experts(self.rank)
            self.placement = initial
            self.placement_active = [1] * self.num_ranks

    # ---------------------------------------------------------------- membership

    def _backend_active(self) -> torch.Tensor | None:
        try:
            from mooncake import pg  # optional: gloo groups work without it
        except ImportError:
            return None
        if not pg.is_mooncake_group(self.group):
            return None
        return pg.get_active_ranks(self.group).reshape(-1)[: self.num_ranks].to(torch.int32)

    def agreed_active_ranks(self) -> list[int]:
        """Collective: the membership every member agrees on (the intersection of what each saw in
        its EP ops and what the backend reports)."""
        seen = self._seen_active.clone()
        backend = self._backend_active()
        if backend is not None:
            seen &= backend
        # control tensors live on the layer's device: a CUDA-only group ("mooncake") takes no CPU
        on_device = seen.to(self.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.MIN, group=self.group)
        seen = on_device.cpu()
        backend = self._backend_active()  # a rank may have died during the all_reduce
        if backend is not None:
            seen &= backend
        self._seen_active = seen
        return [int(v) for v in seen.tolist()]

    def reset_membership(self) -> None:
        """After ``pg.recover_ranks`` and ``buffer.update_ep_member()``: EP ops never set a rank
        back to 1, so the caller does (the next forward rebalances onto the new members)."""
        self._seen_active = torch.ones(self.num_ranks, dtype=torch.int32, device="cpu")

    # ---------------------------------------------------------------- rebalancing

    def _all_gather_held(self, active: list[int]) -> list[int]:
        local = torch.tensor(self.held, dtype=torch.int64, device=self.device)
        size = self.num_ranks * self.config.slots_per_rank
        out = torch.full((size,), -1, dtype=torch.int64, device=self.device)
        _all_gather_single(out, local, group=self.group)
        s = self.config.slots_per_rank
        values = out.cpu().tolist()
        return [v if active[i // s] else -1 for i, v in enumerate(values)]

    def rebalance(self, active: list[int]) -> RebalanceReport:
        """Collective among the active members: agree on the load, place experts on active ranks,
        move weights (peers first, then the checkpoint), and publish which slots hold what."""
        start = time.monotonic()
        c = self.config
        s = c.slots_per_rank
        held = ExpertPlacement.from_phy2log(
            self._all_gather_held(active), c.num_experts, self.num_ranks, s
        )
        load = self.routed_load.to(self.device)
        dist.all_reduce(load, group=self.group)
        load = load.cpu()
        if self.checkpoint is not None:
            available = [True] * c.num_experts
        else:
            available = [bool(n > 0) for n in held.logcnt.tolist()]
        weights = load.to(torch.float64) + 1.0  # +1: unseen experts still count
        target = rebalance_experts(
            weights,
            self.num_ranks,
            s,
            active,
            available=available,
            min_replicas=c.min_replicas,
            previous=held,
        )
        if active == self.placement_active:
            # A load-driven rebalance moves weights only for a real gain (same decision everywhere).
            now = float(held.rank_loads(weights).max())
            if float(target.rank_loads(weights).max()) > now * (1.0 - c.min_gain):
                target = held
        plan = plan_weight_moves(
            held, target, source_ranks=active, allow_storage=self.checkpoint is not None
        )
        failed: list[int] = []
        new_held = target.local_experts(self.rank)
        try:
            execute_weight_moves(
                plan,
                self.rank,
                [self.w13, self.w2],
                group=self.group,
                load_from_storage=self.checkpoint.expert if self.checkpoint is not None else None,
                timeout_s=max(1.0, c.timeout_us / 1e6),
            )
        except WeightMoveError as exc:  # a source died mid-move: those slots hold nothing usable
            failed = exc.failed_peers
            for move in plan.receives_to(self.rank):
                if move.src_rank in failed:
                    new_held[move.dst_slot % s] = -1
        self.held = new_held
        # Publish what every slot really holds; routing uses only those slots.
        published = self._all_gather_held(active)
        self.placement = ExpertPlacement.from_phy2log(
            published, c.num_experts, self.num_ranks, s, policy=target.policy
        )
        self.placement_active = list(active)
        report = RebalanceReport(
            active_ranks=list(active),
            plan=plan.summary(),
            unavailable_experts=self.placement.unavailable_experts(),
            seconds=time.monotonic() - start,
            failed_peers=failed,
        )
        logger.info("eplb rank %d: rebalanced onto %s: %s", self.rank, active, report.plan)
        return report

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardReport]:
        """Collective. ``x``: bf16 ``[N, H]`` (``N <= tokens_per_rank``) -> bf16 ``[N, H]``, report.

        Returns within about two ``timeout_us`` even when ranks die during the pass; lost
        contributions are reported, never waited for."""
        c = self.config
        if x.dim() != 2 or x.shape[1] != c.hidden or x.shape[0] > c.tokens_per_rank:
            raise ValueError(
                f"x must be [N <= {c.tokens_per_rank}, {c.hidden}], got {tuple(x.shape)}"
            )
        active = self.agreed_active_ranks()
        rebalance = None
        every = c.rebalance_every
        if (
            self.placement is None
            or active != self.placement_active
            or (every and self.passes and self.passes % every == 0)
        ):
            rebalance = self.rebalance(active)
        self.passes += 1
        assert self.placement is not None
        topk_idx, topk_weights = route_tokens(x, self.router, c.top_k)
        self.routed_load += torch.bincount(topk_idx.reshape(-1).cpu(), minlength=c.num_experts)
        token_ids = self.rank * c.tokens_per_rank + torch.arange(x.shape[0], device=x.device)
        routed = route_to_physical(topk_idx, self.placement, active, token_ids=token_ids)

        ep_active = torch.tensor(active, dtype=torch.int32, device=self.device)
        num_physical = self.num_ranks * c.slots_per_rank
        recv_x, recv_count, handle, _, _ = self.buffer.dispatch(
            x, routed.topk_idx, ep_active, c.tokens_per_rank, num_physical, c.timeout_us,
            use_fp8=False, cumulative_local_expert_recv_stats=self.recv_stats,
        )  # fmt: skip
        if self.fault_hook is not None:
            self.fault_hook("after_dispatch")
        rows = int(recv_count.max()) if recv_count.numel() else 0
        expert_out = torch.zeros_like(recv_x)
        if rows:
            expert_out[:, :rows] = expert_mlp(recv_x[:, :rows], self.w13, self.w2)
        out, _, _ = self.buffer.combine(
            expert_out, routed.topk_idx, topk_weights, ep_active, c.timeout_us, handle
        )

        after = ep_active.cpu()
        self._seen_active &= after
        owner = routed.topk_idx.clamp(min=0).cpu() // c.slots_per_rank
        dropped = (routed.topk_idx.cpu() >= 0) & (after[owner] == 0)
        lost = routed.lost.cpu() | dropped
        unavailable = sorted({int(e) for e in topk_idx.cpu()[lost].tolist()})
        report = ForwardReport(
            active_ranks=active,
            active_after=[int(v) for v in after.tolist()],
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            lost=lost,
            unavailable_experts=unavailable,
            rebalance=rebalance,
        )
        return out, report
