"""CUDA subset (the GPU machine): 2 and 4 processes on the one GPU, including a kill."""

import pytest
import torch
from cuda_cases import cuda_kill, cuda_ops
from harness import Ranks, run_world

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_cuda_ops(world):
    res = run_world(cuda_ops, world, timeout=280)
    assert all(v == 8 for v in res.values())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_cuda_kill(world):
    victim = world - 1
    with Ranks(timeout=280) as rk:
        for r in range(world):
            rk.start(cuda_kill, r, world, victim)
        res = rk.collect(range(world))
    assert res[victim][0] == "died"
    for r in range(world):
        if r != victim:
            assert res[r] == ("ok", [1 if i != victim else 0 for i in range(world)]), res[r]
