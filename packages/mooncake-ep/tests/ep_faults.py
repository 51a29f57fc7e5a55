"""Per-rank bodies of the fault tests (Mooncake backend): a real SIGKILL at a chosen point, the
survivors' results and timing, then a replacement joining through the backend's recovery.

Scenario keys: ``victim`` (rank), ``stop`` (SIGSTOP instead of SIGKILL: a hung rank that only the
op deadline exposes), ``point`` (a ``mooncake.ep.faults`` point: ``dispatch.start``,
``dispatch.after_counts``, ``combine.start``, ``combine.after_counts``), ``recover`` (bool),
``timeout_us``. Round 0 runs with every rank (so buffers hold an earlier round's data), the victim
dies in round 1, round 2 runs with the victim already inactive, then (``recover``) a replacement
joins and round 3 runs with every rank again.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import torch
import torch.distributed as dist
from ep_cases import check_combine, check_dispatch, make_inputs, simulated_gemm

CASE = {
    "name": "fault",
    "T": 16,
    "H": 256,
    "K": 3,
    "use_fp8": True,
    "structured": True,
    "masked": 0,
}
JOIN_DEADLINE_S = 60.0


def _case(world_size: int) -> dict:
    return dict(CASE, E=2 * world_size)


def ep_round(
    buffer: Any,
    rank: int,
    world_size: int,
    case: dict,
    active: torch.Tensor,
    timeout_us: int,
    alive_dispatch: list[bool],
    alive_combine: list[bool],
) -> tuple[list[str], float, float]:
    """One dispatch + combine with checks; returns (errors, dispatch seconds, combine seconds)."""
    num_local = case["E"] // world_size
    x, topk_idx, weights = make_inputs(case, rank)
    start = time.monotonic()
    result = buffer.dispatch(
        x, topk_idx, active, case["T"], case["E"], timeout_us, use_fp8=case["use_fp8"]
    )
    dispatch_s = time.monotonic() - start
    alive_after_dispatch = [bool(v) for v in active.tolist()]
    errors = check_dispatch(case, rank, world_size, result, alive_dispatch, None)
    simulated = simulated_gemm(result[0], case["use_fp8"], rank, num_local)
    start = time.monotonic()
    combined = buffer.combine(simulated, topk_idx, weights, active, timeout_us, result[2])[0]
    combine_s = time.monotonic() - start
    errors += check_combine(case, rank, world_size, combined, alive_combine)
    if alive_after_dispatch != alive_dispatch:
        errors.append(
            f"rank {rank}: active after dispatch {alive_after_dispatch}, expected {alive_dispatch}"
        )
    return errors, dispatch_s, combine_s


def run_survivor(rank: int, world_size: int, port: int, backend: str, scenario: dict) -> dict:
    from ep_harness import init_group

    import mooncake.pg as pg
    from mooncake.ep.faults import arm_kill
    from mooncake.mooncake_ep_buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    case = _case(world_size)
    victim, point, timeout_us = (
        scenario["victim"],
        scenario["point"],
        scenario.get("timeout_us", 1_000_000),
    )
    buffer = Buffer(group)
    everyone = [True] * world_size
    without = [r != victim for r in range(world_size)]
    active = torch.ones(world_size, dtype=torch.int32)
    report: dict[str, Any] = {"errors": []}
    errors = report["errors"]

    e, _, _ = ep_round(buffer, rank, world_size, case, active, timeout_us, everyone, everyone)
    errors += [f"round 0: {m}" for m in e]
    dist.barrier()
    if rank == victim:  # this process dies (SIGKILL) or hangs (SIGSTOP) at the point in round 1
        arm_kill(point, sig=signal.SIGSTOP if scenario.get("stop") else signal.SIGKILL)

    # Round 1: the victim dies at `point`. Dispatch sees it alive unless it died before/in dispatch.
    dies_in_dispatch = point.startswith("dispatch")
    e, d_s, c_s = ep_round(
        buffer,
        rank,
        world_size,
        case,
        active,
        timeout_us,
        without if dies_in_dispatch else everyone,
        without,
    )
    errors += [f"round 1: {m}" for m in e]
    report["round1_dispatch_s"], report["round1_combine_s"] = d_s, c_s
    limit = timeout_us / 1e6 + 0.1
    if d_s > limit or c_s > limit:
        errors.append(
            f"round 1 took dispatch {d_s:.3f} s, combine {c_s:.3f} s: over timeout_us + 100 ms = "
            f"{limit:.3f} s"
        )
    if active.tolist() != [int(a) for a in without]:
        errors.append(
            f"round 1: active_ranks {active.tolist()}, expected only rank {victim} marked: "
            f"{without}"
        )

    # Round 2: the victim is 0 on entry: nobody waits for it.
    e, d_s, c_s = ep_round(buffer, rank, world_size, case, active, timeout_us, without, without)
    errors += [f"round 2: {m}" for m in e]
    report["round2_s"] = d_s + c_s

    if scenario.get("recover"):
        backend_obj = dist.group.WORLD._get_backend(torch.device("cpu"))
        deadline = time.monotonic() + JOIN_DEADLINE_S
        polls = 0
        while True:
            (ready,) = pg.get_peer_state(backend_obj, [victim])
            if ready:
                pg.recover_ranks(backend_obj, [victim])
                break
            if time.monotonic() > deadline:
                errors.append(f"replacement of rank {victim} not ready within {JOIN_DEADLINE_S} s")
                return report
            polls += 1
            e, _, _ = ep_round(buffer, rank, world_size, case, active, timeout_us, without, without)
            errors += [f"while waiting for the joiner: {m}" for m in e[:3]]
        report["polls"] = polls
        buffer.update_ep_member()
        active.fill_(1)
        e, _, _ = ep_round(buffer, rank, world_size, case, active, timeout_us, everyone, everyone)
        errors += [f"round 3 (after recovery): {m}" for m in e]
        if active.tolist() != [1] * world_size:
            errors.append(f"round 3: active_ranks {active.tolist()}")
    report["path"] = buffer.path.name
    buffer.destroy()
    return report


def run_replacement(rank: int, world_size: int, port: int, backend: str, scenario: dict) -> dict:
    from ep_harness import init_group

    import mooncake.pg as pg
    from mooncake.mooncake_ep_buffer import Buffer

    options = pg.MooncakeBackendOptions(
        torch.ones(world_size, dtype=torch.int32), is_extension=True
    )
    group = init_group(rank, world_size, port, backend, pg_options=options)
    pg.join_group(dist.group.WORLD._get_backend(torch.device("cpu")), timeout=JOIN_DEADLINE_S)
    buffer = Buffer(group)
    case = _case(world_size)
    active = torch.ones(world_size, dtype=torch.int32)
    everyone = [True] * world_size
    errors, _, _ = ep_round(
        buffer,
        rank,
        world_size,
        case,
        active,
        scenario.get("timeout_us", 1_000_000),
        everyone,
        everyone,
    )
    buffer.destroy()
    return {"errors": [f"replacement round: {m}" for m in errors]}
