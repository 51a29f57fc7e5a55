import pytest
from bad_input_cases import mismatches, wrong_active_ranks_size
from harness import run_world


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_mismatch_errors_on_every_rank(world):
    res = run_world(mismatches, world, timeout=150)
    for r, errs in res.items():
        assert len(errs) == 5


@pytest.mark.timeout(120)
def test_wrong_active_ranks_size():
    res = run_world(wrong_active_ranks_size, 2, timeout=100)
    assert all("active_ranks" in m for m in res.values())
