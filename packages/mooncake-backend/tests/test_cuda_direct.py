"""The direct CUDA path on the GPU machine: 2 and 4 processes on the one GPU
(``tools/gpu-test direct``)."""

import pytest
import torch
from cuda_direct_cases import (
    direct_capture,
    direct_kill,
    direct_ops,
    direct_recover_joiner,
    direct_recover_survivor,
)
from harness import Ranks, run_world

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_direct_ops_match_cpu(world):
    res = run_world(direct_ops, world, timeout=580)
    assert all(v > 100 for v in res.values()), res


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_direct_kill_survivors_identical(world):
    victim = world - 1
    with Ranks(timeout=280) as rk:
        for r in range(world):
            rk.start(direct_kill, r, world, victim)
        res = rk.collect(range(world))
    assert res[victim][0] == "died", res[victim]
    survivors = [res[r] for r in range(world) if r != victim]
    for status, val in survivors:
        assert status == "ok", val
        assert val[0] == [1 if i != victim else 0 for i in range(world)], val
        assert val[2] < 20.0, f"survivors took {val[2]:.1f} s after the kill (op timeout 20 s)"
    # identical results on every survivor, op by op
    assert len({tuple(v[1]) for _, v in survivors}) == 1, survivors


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_direct_replacement_admitted(world):
    victim = world - 1
    with Ranks(timeout=280) as rk:
        for r in range(world):
            if r == victim:
                rk.start(direct_kill, r, world, victim, 1000, 3, key=(r, 0))
            else:
                rk.start(direct_recover_survivor, r, world, victim, key=(r, 0))
        rk.procs[(victim, 0)].join(timeout=120)
        assert rk.procs[(victim, 0)].exitcode == -9
        rk.start(direct_recover_joiner, victim, world, key=(victim, 1))
        keys = [(r, 0) for r in range(world) if r != victim] + [(victim, 1)]
        res = rk.collect(keys)
    for k, v in res.items():
        assert v == ("ok", "ok"), (k, v)


@pytest.mark.timeout(200)
def test_direct_graph_capture_refused():
    res = run_world(direct_capture, 2, timeout=180)
    assert all("CUDA graph" in v for v in res.values()), res
