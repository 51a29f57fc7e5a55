"""Multi-process dispatch/combine against the plain-torch reference (portable path; ``mooncake-cpu``
unless ``MOONCAKE_EP_TEST_BACKEND`` names another backend, e.g. ``gloo``).

One spawn per world size runs a list of cases (spawns dominate the time on 2 cores). The unmarked
tests are a representative subset; the ``slow`` ones run the full option matrix.
"""

from __future__ import annotations

import itertools

import pytest
from ep_harness import TEST_BACKEND as BACKEND
from ep_harness import assert_all_ok, run_world

# Representative subset: every option appears at least once, every mode, -1 entries, uneven and
# zero token counts, H not a power of two and not a multiple of 512, two dispatches alive at once.
QUICK_CASES = [
    {
        "name": "bf16-structured-masked",
        "T": 16,
        "H": 256,
        "L": 3,
        "K": 3,
        "masked": 6,
        "tokens": [16, 9, 0, 13],
    },
    {
        "name": "fp8-structured-async",
        "T": 16,
        "H": 384,
        "L": 3,
        "K": 4,
        "use_fp8": True,
        "mode": "async",
        "masked": 3,
    },
    {
        "name": "fp8-round-hook",
        "T": 16,
        "H": 256,
        "L": 2,
        "K": 3,
        "use_fp8": True,
        "round_scale": True,
        "mode": "hook",
        "tokens": [3, 16],
    },
    {
        "name": "fp8-ue8m0-random",
        "T": 12,
        "H": 640,
        "L": 3,
        "K": 4,
        "use_fp8": True,
        "round_scale": True,
        "use_ue8m0": True,
        "structured": False,
        "masked": 4,
        "use_out": True,
    },
    {
        "name": "bf16-random-zero-copy",
        "T": 16,
        "H": 256,
        "L": 2,
        "K": 2,
        "structured": False,
        "zero_copy": True,
        "mode": "hook",
    },
    {
        "name": "fp8-two-alive",
        "T": 8,
        "H": 256,
        "L": 2,
        "K": 2,
        "use_fp8": True,
        "two_alive": True,
        "masked": 2,
    },
    {"name": "after-update-member", "T": 8, "H": 256, "L": 2, "K": 2, "update_member": True},
    {
        "name": "top16",
        "T": 8,
        "H": 128,
        "L": 8,
        "K": 16,
        "use_fp8": True,
        "structured": False,
        "tokens": [8, 1],
    },
]


def _check(results, cases: list[dict]) -> None:
    values = assert_all_ok(results)
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors[:40])
    assert all(v["path"][0] == "portable" for v in values)
    assert all(sorted(v["timings"]) == sorted(c["name"] for c in cases) for v in values)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_quick_matrix(world_size: int) -> None:
    cases = QUICK_CASES if world_size != 3 else QUICK_CASES[:5]
    _check(
        run_world(world_size, "ep_cases:run_matrix", (cases,), backend=BACKEND, timeout=170), cases
    )


@pytest.mark.timeout(120)
def test_single_rank() -> None:
    cases = [
        {"name": "r1-fp8", "T": 16, "H": 256, "L": 4, "K": 2, "use_fp8": True, "masked": 2},
        {"name": "r1-bf16-hook", "T": 4, "H": 128, "L": 2, "K": 2, "mode": "hook", "tokens": [0]},
    ]
    _check(run_world(1, "ep_cases:run_matrix", (cases,), backend=BACKEND, timeout=110), cases)


def full_matrix() -> list[dict]:
    """Every combination of use_fp8/round_scale/use_ue8m0 x mode x zero_copy, structured, random."""
    cases = []
    fp8_options = [
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, True, True),
    ]
    for (use_fp8, round_scale, ue8m0), mode, zero_copy, structured in itertools.product(
        fp8_options, ("sync", "async", "hook"), (False, True), (True, False)
    ):
        name = (
            f"fp8={int(use_fp8)}-round={int(round_scale)}-ue8m0={int(ue8m0)}-{mode}"
            f"-zc={int(zero_copy)}-s={int(structured)}"
        )
        cases.append(
            {
                "name": name,
                "T": 24,
                "H": 512 if ue8m0 else 384,
                "L": 3,
                "K": 5,
                "use_fp8": use_fp8,
                "round_scale": round_scale,
                "use_ue8m0": ue8m0,
                "mode": mode,
                "zero_copy": zero_copy,
                "structured": structured,
                "masked": 5,
                "tokens": [24, 0, 17, 5],
                "use_out": zero_copy,
                "seed": len(cases),
            }
        )
    for use_fp8, round_scale, ue8m0 in fp8_options:
        cases.append(
            {
                "name": f"two-alive-fp8={int(use_fp8)}-{int(round_scale)}{int(ue8m0)}",
                "T": 16,
                "H": 512,
                "L": 2,
                "K": 3,
                "use_fp8": use_fp8,
                "round_scale": round_scale,
                "use_ue8m0": ue8m0,
                "two_alive": True,
                "masked": 3,
            }
        )
    return cases


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_full_matrix(world_size: int) -> None:
    cases = full_matrix()
    _check(
        run_world(world_size, "ep_cases:run_matrix", (cases,), backend=BACKEND, timeout=880), cases
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_large_shapes() -> None:
    cases = [
        {
            "name": "hidden-7168-fp8",
            "T": 128,
            "H": 7168,
            "L": 8,
            "K": 8,
            "use_fp8": True,
            "structured": False,
            "masked": 10,
        },
        {
            "name": "max-T-bf16",
            "T": 1024,
            "H": 128,
            "L": 2,
            "K": 4,
            "tokens": [1024, 700],
            "masked": 20,
        },
    ]
    _check(run_world(2, "ep_cases:run_matrix", (cases,), backend=BACKEND, timeout=580), cases)
