"""Expert-parallel load balancing (EPLB) for Mooncake EP: placement of logical experts on physical
slots of live ranks, routing to live replicas, and weight movement when the placement changes.

    placement = rebalance_experts(load, num_ranks, slots_per_rank, active_ranks)
    routed = route_to_physical(topk_idx, placement, active_ranks, token_ids)
    plan = plan_weight_moves(old_placement, placement, source_ranks)
    execute_weight_moves(plan, rank, [w13, w2])
"""

from mooncake.ep.eplb.balancer import pack_replicas, rebalance_experts, replicate_experts
from mooncake.ep.eplb.placement import ExpertPlacement, logical_load_from_physical
from mooncake.ep.eplb.routing import PhysicalRouting, route_to_physical
from mooncake.ep.eplb.weight_plan import (
    WeightMove,
    WeightMoveError,
    WeightMovePlan,
    WeightMoveResult,
    execute_weight_moves,
    plan_weight_moves,
)

__all__ = [
    "ExpertPlacement",
    "PhysicalRouting",
    "WeightMove",
    "WeightMoveError",
    "WeightMovePlan",
    "WeightMoveResult",
    "execute_weight_moves",
    "logical_load_from_physical",
    "pack_replicas",
    "plan_weight_moves",
    "rebalance_experts",
    "replicate_experts",
    "route_to_physical",
]
