"""Fault semantics with real kills (Mooncake backend, ``mooncake-cpu``, portable path).

A rank SIGKILLs itself at a chosen point of round 1 (``mooncake.ep.faults``): before dispatch,
inside dispatch after the count exchange, between dispatch and combine, inside combine after the
count exchange; or it stops (SIGSTOP) and only the op deadline exposes it. Survivors must finish
each op within ``timeout_us + 100 ms``, mark exactly that
rank in ``active_ranks``, drop its tokens, and combine must equal the reference without its experts;
round 0 ran first so buffers hold earlier data. With ``recover``, a replacement process joins
through the backend (``get_peer_state``/``recover_ranks``/``join_group``), survivors call
``update_ep_member``, the replacement builds a new ``Buffer``, and a full round is exact again.
"""

from __future__ import annotations

import os
import signal

import pytest

pg = pytest.importorskip(
    "mooncake.pg", reason="mooncake.pg (mooncake-backend) is not installed: fault tests need it"
)

from ep_harness import spawn_rank, start_world  # noqa: E402 - after the skip

BACKEND = "mooncake-cpu"


def run_scenario(world_size: int, scenario: dict, timeout: float = 150) -> None:
    world = start_world(world_size, "ep_faults:run_survivor", (scenario,), backend=BACKEND)
    victim = scenario["victim"]
    if scenario.get("stop"):  # the stopped victim never exits: kill it once the survivors are done
        for slot, proc in world.procs.items():
            if slot != str(victim):
                proc.join(timeout)
        os.kill(world.procs[str(victim)].pid, signal.SIGKILL)
    if scenario.get("recover"):
        victim_proc = world.procs[str(victim)]
        victim_proc.join(60)
        assert victim_proc.exitcode == -9, (
            f"the victim did not die by SIGKILL (exit {victim_proc.exitcode})"
        )
        spawn_rank(
            world,
            victim,
            "ep_faults:run_replacement",
            (scenario,),
            BACKEND,
            slot=f"{victim}-replacement",
        )
    results = world.results(timeout)
    problems = []
    for r in results:
        if r.slot == str(victim):
            if r.exitcode != -9:
                problems.append(
                    f"victim rank {victim}: expected SIGKILL, got exit {r.exitcode}: "
                    f"{r.error[-2000:]}"
                )
            continue
        if not r.ok:
            problems.append(f"slot {r.slot}: {r.error[-3000:]}")
        else:
            problems += [f"slot {r.slot}: {e}" for e in r.value["errors"]]
    assert not problems, "\n".join(problems[:30])


@pytest.mark.timeout(200)
def test_kill_in_combine_then_replacement_joins() -> None:
    run_scenario(3, {"victim": 2, "point": "combine.after_counts", "recover": True})


@pytest.mark.timeout(200)
def test_kill_rank0_before_dispatch() -> None:
    run_scenario(3, {"victim": 0, "point": "dispatch.start"})


@pytest.mark.timeout(200)
def test_hung_rank_is_failed_at_the_deadline() -> None:
    # SIGSTOP: the process is alive but silent; only timeout_us (500 ms from the op's start)
    # exposes it.
    run_scenario(
        3, {"victim": 1, "point": "dispatch.after_counts", "stop": True, "timeout_us": 500_000}
    )


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("world_size", "victim", "point", "recover"),
    [
        (4, 1, "dispatch.after_counts", False),
        (4, 3, "combine.start", True),
        (2, 1, "dispatch.start", True),
        (4, 0, "combine.after_counts", True),
    ],
)
def test_kill_matrix(world_size: int, victim: int, point: str, recover: bool) -> None:
    run_scenario(world_size, {"victim": victim, "point": point, "recover": recover})
