"""Recovery with the spec's snippets: replacement of failed ranks and growth."""

import time

import pytest
from harness import Ranks
from recovery_cases import (
    _survivor_then_victim,
    grow_joiner,
    grow_survivor,
    joiner,
    survivor,
    victim,
)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("victims", [[2], [0], [1, 3]], ids=["rank2", "rank0", "two-successive"])
def test_spec_recovery_snippet(victims):
    world = 4
    with Ranks(timeout=200) as rk:
        for r in range(world):
            if r == victims[0]:
                rk.start(victim, r, world, victims, key=(r, 0))
            else:
                rk.start(
                    survivor if r not in victims else _survivor_then_victim,
                    r,
                    world,
                    victims,
                    key=(r, 0),
                )
        for i, v in enumerate(victims):
            # wait for the victim's death, then start its replacement
            proc = rk.procs[(v, 0)]
            proc.join(timeout=60)
            assert proc.exitcode == -9, f"victim {v} exit code {proc.exitcode}"
            rk.start(joiner, v, world, i, victims, key=(v, 1))
        keys = [(r, 0) for r in range(world) if r not in victims] + [(v, 1) for v in victims]
        res = rk.collect(keys)
    for k, (status, detail) in res.items():
        assert status == "ok", f"{k} {status}:\n{detail}"
    for v in victims:
        first_op = res[(v, 1)][1]
        assert first_op < 10.0, f"replacement {v}: first full-world op after {first_op:.2f} s"


@pytest.mark.timeout(180)
def test_growth_from_2_to_4():
    with Ranks(timeout=150) as rk:
        for r in range(2):
            rk.start(grow_survivor, r, 2, 4)
        time.sleep(1.0)
        for r in (2, 3):
            rk.start(grow_joiner, r, 2, 4)
        res = rk.collect(range(4))
    for k, (status, detail) in res.items():
        assert status == "ok", f"{k} {status}:\n{detail}"
        assert detail == [1, 1, 1, 1]


@pytest.mark.timeout(180)
def test_subgroup_recovers_with_world():
    from recovery_cases import sub_joiner, sub_survivor, sub_victim

    world, v = 3, 2
    with Ranks(timeout=150) as rk:
        for r in range(world):
            rk.start(sub_victim if r == v else sub_survivor, r, world, v, key=(r, 0))
        rk.procs[(v, 0)].join(timeout=60)
        assert rk.procs[(v, 0)].exitcode == -9
        rk.start(sub_joiner, v, world, v, key=(v, 1))
        res = rk.collect([(0, 0), (1, 0), (v, 1)])
    for k, (status, detail) in res.items():
        assert status == "ok", f"{k} {status}:\n{detail}"
