"""The fast path in proxy mode (``cuda-proxy``, ``MOONCAKE_EP_TRANSPORT=proxy``) on one GPU.

Ranks are processes on the one GPU (time-sliced). The kernels are the P2P path's, instantiated
with the host-proxy transport: the symmetric buffer is a transfer-engine segment mapped into the
GPU, and puts to other ranks travel through each rank's proxy thread, over shared memory or, with
``MOONCAKE_EP_PROXY_TRANSPORT=tcp``, over TCP. Same checks as ``test_cuda_fast_path.py`` (whose
rank functions run here): the option matrix bit-exact against the portable path, hooks,
zero-copy, CUDA-graph capture and replay, silent ranks, kill -9 marked within ``timeout_us`` +
100 ms, a killed rank replaced (``update_ep_member``); and the one-rank DeepEP shape's kernel times
next to the P2P mode's. ``tools/gpu-test proxy`` runs them.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from test_cuda_fast_path import CASES, FP8, REASON, _case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(REASON is not None, reason=f"CUDA fast path not runnable here: {REASON}"),
]

PROXY = {"MOONCAKE_EP_TRANSPORT": "proxy", "MOONCAKE_EP_TEST_EXPECT_PATH": "cuda-proxy"}
PROXY_TCP = {**PROXY, "MOONCAKE_EP_PROXY_TRANSPORT": "tcp"}
EXTRAS = ["update", "two_alive", "graph", "missing"]


def _matrix(world_size: int, env: dict, cases: list, extras: list, timeout: float) -> list:
    from ep_harness import run_matrix

    return run_matrix(world_size, env, cases, extras, timeout, "cuda-proxy")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 4])
def test_proxy_matrix_shm(world_size: int) -> None:
    """Every option combination over the proxy (peers on one host: shared memory), bit-exact
    against the portable path; hooks, zero-copy, graphs, update_ep_member, silent ranks."""
    values = _matrix(world_size, PROXY, CASES, EXTRAS, 560)
    for v in values:
        transports = [t for t in v["proxy"]["transports"] if t is not None]
        assert transports, v["proxy"]
        assert all(t == "shm" for t in transports), v["proxy"]
        assert v["proxy"]["stats"]["consumed"] > 0, v["proxy"]


@pytest.mark.timeout(600)
def test_proxy_matrix_tcp() -> None:
    """The same matrix with the proxy forced over TCP (signals through the signal applier)."""
    values = _matrix(2, PROXY_TCP, CASES, EXTRAS, 560)
    for v in values:
        assert [t for t in v["proxy"]["transports"] if t is not None] == ["tcp"], v["proxy"]
        assert v["proxy"]["stats"]["signals_notify"] > 0, v["proxy"]
        assert v["proxy"]["stats"]["signals_applied"] > 0, v["proxy"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("world_size", "point", "occurrence", "env"),
    [
        (2, "dispatch.start", 3, PROXY),
        (4, "combine.after_send", 2, PROXY),
        (2, "dispatch.start", 3, PROXY_TCP),
    ],
    ids=["2-shm", "4-shm", "2-tcp"],
)
def test_proxy_kill(world_size: int, point: str, occurrence: int, env: dict) -> None:
    """SIGKILL the last rank in proxy mode: the survivors' ops return within timeout_us + 100 ms
    with it masked, and stay exact (its descriptors are dropped, nothing waits for it)."""
    from ep_harness import run_kill

    run_kill(world_size, env, _case("kill", **FP8), point, occurrence)


@pytest.mark.timeout(400)
def test_proxy_kill_then_replacement() -> None:
    """SIGKILL a rank in proxy mode; a new process (new engine, new segment) joins in its place;
    survivors reconnect with update_ep_member; a full round is exact on every rank."""
    pytest.importorskip("mooncake.pg", reason="mooncake.pg (mooncake-backend) is not installed")
    from ep_harness import spawn_rank, start_world

    world_size, victim = 3, 2
    case = _case("replace", **FP8)
    world = start_world(
        world_size,
        "test_cuda_fast_path:rank_replace_survivor",
        (case,),
        backend="mooncake-cpu",
        env=PROXY,
    )
    world.procs[str(victim)].join(200)
    assert world.procs[str(victim)].exitcode == -9, "the victim did not die by SIGKILL"
    spawn_rank(
        world,
        victim,
        "test_cuda_fast_path:rank_replacement",
        (case,),
        "mooncake-cpu",
        env=PROXY,
        slot=f"{victim}-replacement",
    )
    results = world.results(300)
    problems = []
    for r in results:
        if r.slot == str(victim):
            continue
        if not r.ok:
            problems.append(f"slot {r.slot}: {r.error[-3000:]}")
            continue
        problems += r.value["errors"]
        if (
            r.value["path"] != "cuda-proxy"
            or r.value.get("path_after", "cuda-proxy") != "cuda-proxy"
        ):
            problems.append(f"slot {r.slot}: path {r.value}")
    assert len(results) == world_size + 1
    assert not problems, "\n".join(problems[:40])


def _bench(env: dict, out: str) -> dict:
    from ep_harness import run_kernel_bench

    return run_kernel_bench(env, out)


@pytest.mark.timeout(600)
def test_proxy_one_rank_deepep_shape_kernel_times() -> None:
    """One rank, DeepEP's shape (128 tokens, H 7168, top-8, 288 experts, FP8 dispatch): kernel
    times in proxy mode next to P2P mode, same process layout. Printed (``-s``) and written to
    $OUT/proxy_vs_p2p.json when OUT is set. With one rank all traffic is the rank's own, so the
    proxy thread carries nothing: the difference is the symmetric buffer in mapped host memory."""
    folder = os.environ.get("OUT") or tempfile.mkdtemp(prefix="mooncake-ep-proxy-bench-")
    p2p = _bench({"MOONCAKE_EP_TRANSPORT": "p2p"}, os.path.join(folder, "bench_p2p.json"))
    proxy = _bench({"MOONCAKE_EP_TRANSPORT": "proxy"}, os.path.join(folder, "bench_proxy.json"))
    assert p2p["path"] == "cuda-p2p"
    assert proxy["path"] == "cuda-proxy"
    keys = ("dispatch_us", "combine_us", "e2e_median_us")
    table = {k: {"p2p": round(p2p[k], 2), "proxy": round(proxy[k], 2)} for k in keys}
    with open(os.path.join(folder, "proxy_vs_p2p.json"), "w") as f:
        json.dump(table, f, indent=2)
    print("\n1 rank, DeepEP shape, kernel medians (us):", json.dumps(table))
    assert proxy["kernel_error_flags"] == 0
    assert p2p["kernel_error_flags"] == 0
