import pytest
from harness import run_world
from ops_cases import ddp_body


@pytest.mark.timeout(180)
def test_ddp_replicas_stay_identical():
    res = run_world(ddp_body, 3, timeout=160)
    assert len(set(res.values())) == 1
