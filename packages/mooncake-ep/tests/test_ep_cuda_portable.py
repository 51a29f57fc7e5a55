"""The portable path on CUDA tensors (GPU machine only): NCCL with one rank, and gloo with two ranks
on one GPU (the path stages CUDA tensors through the CPU because gloo cannot move them). The
path is forced to ``portable``; the fast path has its own tests (``test_cuda_fast_path.py``)."""

from __future__ import annotations

import pytest
import torch
from ep_harness import assert_all_ok, run_world

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

CASES = [
    {"name": "cuda-bf16", "T": 16, "H": 256, "L": 4, "K": 3, "masked": 3, "device": "cuda"},
    {"name": "cuda-fp8-hook", "T": 16, "H": 384, "L": 5, "K": 4, "use_fp8": True, "mode": "hook",
     "device": "cuda", "structured": False},
    {"name": "cuda-ue8m0-async-zc", "T": 8, "H": 640, "L": 3, "K": 2, "use_fp8": True,
     "round_scale": True, "use_ue8m0": True, "mode": "async", "zero_copy": True, "device": "cuda"},
]  # fmt: skip


def _check(results) -> None:
    values = assert_all_ok(results)
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors[:40])
    assert all(len(v["timings"]) == len(CASES) for v in values)


@pytest.mark.timeout(180)
def test_nccl_one_rank() -> None:
    env = {"MOONCAKE_EP_PATH": "portable"}
    _check(run_world(1, "ep_cases:run_matrix", (CASES,), backend="nccl", timeout=170, env=env))


@pytest.mark.timeout(180)
def test_gloo_two_ranks_staged_through_cpu() -> None:
    env = {"MOONCAKE_EP_PATH": "portable"}
    _check(run_world(2, "ep_cases:run_matrix", (CASES,), backend="gloo", timeout=170, env=env))
