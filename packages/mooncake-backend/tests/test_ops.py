import pytest
from harness import run_world
from ops_cases import ops_body


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_op_dtype_and_reduce_op(world):
    res = run_world(ops_body, world, timeout=280)
    assert all(v > 500 for v in res.values()), res


@pytest.mark.timeout(400)
def test_every_op_world_8():
    res = run_world(ops_body, 8, (1, 40000), timeout=380)
    assert all(v > 300 for v in res.values()), res


@pytest.mark.timeout(120)
def test_all_to_all_single_with_empty_inputs_and_outputs():
    from ops_cases import empty_splits_body

    res = run_world(empty_splits_body, 4, timeout=100)
    assert res == {0: 3, 1: 0, 2: 3, 3: 3}


@pytest.mark.timeout(120)
def test_coalesced_large_tensors():
    from ops_cases import coalesced_large_body

    assert all(run_world(coalesced_large_body, 3, timeout=100).values())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_native_fold_matches_torch_bitwise(world):
    from ops_cases import native_fold_body

    res = run_world(native_fold_body, world, timeout=100)
    assert all(v == 3 * 12 for v in res.values()), res
