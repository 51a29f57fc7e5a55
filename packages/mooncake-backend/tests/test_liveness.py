"""Init methods, no false positives for slow ranks, SIGSTOP detection at the heartbeat timeout."""

import os
import signal
import time

import pytest
from harness import Ranks, free_port, run_world
from liveness_cases import init_method_body, slow_rank_body, stopped_rank_body


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["tcp", "file"])
def test_init_methods(scheme, tmp_path):
    method = f"tcp://127.0.0.1:{free_port()}" if scheme == "tcp" else f"file://{tmp_path}/rdzv"
    res = run_world(init_method_body, 2, method, timeout=100)
    assert all(res.values())


@pytest.mark.timeout(120)
def test_slow_but_alive_rank_is_not_failed():
    res = run_world(slow_rank_body, 3, 1, 1.5, timeout=100)
    assert all(res.values())


@pytest.mark.timeout(120)
def test_sigstop_is_failed_at_heartbeat_timeout(tmp_path):
    world, victim, hb = 3, 1, 0.5
    ready = str(tmp_path / "ready")
    with Ranks(timeout=100) as rk:
        for r in range(world):
            rk.start(stopped_rank_body, r, world, victim, ready)
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"{ready}.{r}") for r in range(world)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        t_stop = time.time()
        os.kill(rk.procs[victim].pid, signal.SIGSTOP)
        try:
            res = rk.collect([r for r in range(world) if r != victim])
        finally:
            os.kill(rk.procs[victim].pid, signal.SIGKILL)
    for r, (status, t_excl) in res.items():
        assert status == "ok", t_excl
        dt = t_excl - t_stop
        # DEAD at the heartbeat timeout (+20%), plus the op's agreement and scheduling slack
        assert hb * 0.8 <= dt <= hb * 1.2 + 0.3, f"rank {r}: excluded {dt:.3f} s after SIGSTOP"


@pytest.mark.timeout(120)
def test_idle_rank_uses_under_2_percent_of_a_core():
    from liveness_cases import idle_cpu_body

    res = run_world(idle_cpu_body, 4, timeout=100)
    assert all(pct < 2.0 for pct in res.values()), res
