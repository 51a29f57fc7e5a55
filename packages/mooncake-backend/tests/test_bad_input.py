import pytest
from bad_input_cases import mismatches, wrong_active_ranks_size
from harness import run_world


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_mismatch_errors_on_every_rank(world):
    res = run_world(mismatches, world, timeout=150)
    # Every rank raised for each of the five cases (``_expect`` fails the rank otherwise), and
    # every rank names the same reporters: one agreed error, not a per-rank guess.
    reporters = {
        r: [m.split("(reported by ranks ", 1)[1].split(")", 1)[0] for m in errs]
        for r, errs in res.items()
    }
    assert all(v == reporters[0] for v in reporters.values()), reporters
    for errs in res.values():
        assert all("disagree on the op" in m for m in errs), errs


@pytest.mark.timeout(120)
def test_wrong_active_ranks_size():
    res = run_world(wrong_active_ranks_size, 2, timeout=100)
    assert all("active_ranks" in m for m in res.values())
