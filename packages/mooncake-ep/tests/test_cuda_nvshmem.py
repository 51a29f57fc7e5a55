"""The fast path in NVSHMEM mode (``cuda-nvshmem``, ``MOONCAKE_EP_TRANSPORT=nvshmem``) on one GPU.

Ranks are processes on the one GPU (time-sliced), NVSHMEM bootstrapped through the group (unique
id), ``NVSHMEM_REMOTE_TRANSPORT=none`` and ``NVSHMEM_DISABLE_NVLS=1`` (one GPU, no NIC). Every peer
is mapped by ``nvshmem_ptr``, so by default the kernels run their P2P instantiation over NVSHMEM's
addresses; with ``MOONCAKE_EP_NVSHMEM_DIRECT=off`` every transfer to another rank is an NVSHMEM
operation (``NvshmemTransport``: ``nvshmem_putmem_nbi``, ``nvshmem_uint64_p``,
``nvshmemx_signal_op``, ``nvshmem_fence``), the path IBGDA takes across nodes. Same checks as
``test_cuda_proxy.py``: the option matrix bit-exact against the portable path (rank functions of
``test_cuda_fast_path.py``), graphs, silent ranks, kill -9 marked within ``timeout_us`` + 100 ms;
plus ``update_ep_member``'s clear error naming the proxy mode, and the one-rank DeepEP shape's
kernel times next to the P2P mode's. ``bash tools/gpu-ep build nvshmem`` runs them.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import pytest
from test_cuda_fast_path import CASES, FP8, REASON, _buffers, _case, _resolve


def _nvshmem_reason() -> Optional[str]:
    if REASON is not None:
        return REASON
    try:
        from mooncake.ep import nvshmem_path

        nvshmem_path.load()
    except OSError as exc:
        return str(exc)
    return None


NV_REASON = _nvshmem_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        NV_REASON is not None, reason=f"NVSHMEM mode not runnable here: {NV_REASON}"
    ),
]

ONE_GPU = {
    "NVSHMEM_REMOTE_TRANSPORT": "none",
    "NVSHMEM_DISABLE_NVLS": "1",
    "NVSHMEM_SYMMETRIC_SIZE": str(1 << 30),
}
NVSHMEM = {
    **ONE_GPU,
    "MOONCAKE_EP_TRANSPORT": "nvshmem",
    "MOONCAKE_EP_TEST_EXPECT_PATH": "cuda-nvshmem",
}
NVSHMEM_PUTS = {**NVSHMEM, "MOONCAKE_EP_NVSHMEM_DIRECT": "off"}
# "update" is left out: update_ep_member raises in this mode (test_nvshmem_update_ep_member_error).
EXTRAS = ["two_alive", "graph", "missing"]


def _matrix(world_size: int, env: dict, timeout: float) -> list:
    from ep_harness import run_matrix

    return run_matrix(world_size, env, CASES, EXTRAS, timeout, "cuda-nvshmem")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 4])
def test_nvshmem_matrix(world_size: int) -> None:
    """Every option combination in NVSHMEM mode (peers mapped: direct stores), bit-exact against
    the portable path; hooks, zero-copy, graphs, silent ranks."""
    _matrix(world_size, NVSHMEM, 560)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 4])
def test_nvshmem_matrix_puts(world_size: int) -> None:
    """The same matrix with every transfer to another rank an NVSHMEM operation (the
    NvshmemTransport kernels: the IBGDA path's code, here over NVSHMEM's P2P transport)."""
    _matrix(world_size, NVSHMEM_PUTS, 560)


def rank_transport(rank: int, world_size: int, port: int, backend: str) -> dict:
    """The NVSHMEM path's kernel kind and mappings, then update_ep_member's error (raised before
    any collective, on every rank), then one more op that still works."""
    import torch

    from mooncake.ep.path import RecoveryUnsupported

    case = _resolve(_case("update", **FP8), world_size)
    fast, _ = _buffers(rank, world_size, port, backend, [(case["T"], case["H"], case["E"])])
    out: dict[str, Any] = {
        "path": fast.path.name,
        "reason": fast.path.reason,
        "kernel_transport": getattr(fast.path, "kernel_transport", None),
        "mapped": getattr(fast.path, "mapped", None),
    }
    try:
        fast.update_ep_member()
        out["update"] = "no error"
    except RecoveryUnsupported as exc:
        out["update"] = str(exc)
    # Still usable afterwards: one round through the matrix's own checker.
    from test_cuda_fast_path import _run_case

    portable_errors = []
    try:
        import torch.distributed as dist

        from mooncake.ep.buffer import Buffer

        portable = Buffer(dist.new_group(backend="gloo"), 0, path="portable")
        portable_errors = _run_case(fast, portable, rank, world_size, {**case, "name": "after"})
    except Exception as exc:
        portable_errors = [f"{type(exc).__name__}: {exc}"]
    out["errors"] = portable_errors
    torch.cuda.synchronize()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("env", [NVSHMEM, NVSHMEM_PUTS], ids=["direct", "puts"])
def test_nvshmem_update_ep_member_error(env: dict) -> None:
    """update_ep_member in NVSHMEM mode raises RecoveryUnsupported naming the proxy mode on every
    rank; the buffer keeps working."""
    from ep_harness import assert_all_ok, run_world

    values = assert_all_ok(
        run_world(2, "test_cuda_nvshmem:rank_transport", (), backend="gloo", timeout=240, env=env)
    )
    want_kind = "nvshmem" if env is NVSHMEM_PUTS else "p2p"
    for v in values:
        assert v["path"] == "cuda-nvshmem", v
        assert v["kernel_transport"] == want_kind, v
        assert "MOONCAKE_EP_TRANSPORT=proxy" in v["update"], v["update"]
        assert "NVSHMEM" in v["update"], v["update"]
        assert not v["errors"], v["errors"]
    if env is NVSHMEM:
        assert all(all(v["mapped"]) for v in values), values


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("world_size", "point", "occurrence", "env"),
    [
        (2, "dispatch.start", 3, NVSHMEM),
        (4, "combine.after_send", 2, NVSHMEM),
        (2, "dispatch.start", 3, NVSHMEM_PUTS),
    ],
    ids=["2-direct", "4-direct", "2-puts"],
)
def test_nvshmem_kill(world_size: int, point: str, occurrence: int, env: dict) -> None:
    """SIGKILL the last rank (a PE) in NVSHMEM mode: the survivors' ops return within
    timeout_us + 100 ms with it masked, never wait for it again, and stay exact."""
    from ep_harness import run_kill

    run_kill(world_size, env, _case("kill", **FP8), point, occurrence)


def _bench(env: dict, out: str) -> dict:
    from ep_harness import run_kernel_bench

    return run_kernel_bench(env, out)


@pytest.mark.timeout(600)
def test_nvshmem_one_rank_deepep_shape_kernel_times() -> None:
    """One rank, DeepEP's shape (128 tokens, H 7168, top-8, 288 experts, FP8 dispatch): kernel
    times in NVSHMEM mode (direct, and with NVSHMEM operations) next to P2P mode. Printed (``-s``)
    and written to $OUT/nvshmem_vs_p2p.json when OUT is set. With one rank all traffic is the
    rank's own: the difference is the symmetric buffer in NVSHMEM's heap and, for ``puts``, the
    NvshmemTransport instantiation (generic hidden size, staged sends, a fence per block)."""
    folder = os.environ.get("OUT") or tempfile.mkdtemp(prefix="mooncake-ep-nvshmem-bench-")
    p2p = _bench({"MOONCAKE_EP_TRANSPORT": "p2p"}, os.path.join(folder, "bench_p2p.json"))
    direct = _bench(NVSHMEM, os.path.join(folder, "bench_nvshmem.json"))
    puts = _bench(NVSHMEM_PUTS, os.path.join(folder, "bench_nvshmem_puts.json"))
    assert p2p["path"] == "cuda-p2p"
    assert direct["path"] == "cuda-nvshmem"
    assert puts["path"] == "cuda-nvshmem"
    keys = ("dispatch_us", "combine_us", "e2e_median_us")
    table = {
        k: {
            "p2p": round(p2p[k], 2),
            "nvshmem": round(direct[k], 2),
            "nvshmem_puts": round(puts[k], 2),
        }
        for k in keys
    }
    with open(os.path.join(folder, "nvshmem_vs_p2p.json"), "w") as f:
        json.dump(table, f, indent=2)
    print("\n1 rank, DeepEP shape, kernel medians (us):", json.dumps(table))
    for result in (p2p, direct, puts):
        assert result["kernel_error_flags"] == 0
