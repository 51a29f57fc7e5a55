"""What real clients rely on (Mooncake's ``test_mooncake_ep.py``, DeepEP's ``test_low_latency.py``,
SGLang's Mooncake dispatcher and elastic-EP flow), tested in our own words: ``active_ranks`` longer
than the group, ``group_size`` / ``_use_fallback``, a second ``Buffer`` meeting
``update_ep_member``, DeepEP's mask API and ``topk_idx_t``, the classic ``mooncake.ep`` re-exports
of ``mooncake.pg``, ``torch.set_default_device``, and a host path that stays out of torch's Python
function handling.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from ep_harness import assert_all_ok, run_world, start_world
from test_cuda_fast_path import _unusable_reason as fast_path_unusable_reason

import mooncake.ep
from mooncake.ep import deep_ep_compat

SRC = os.path.join(os.path.dirname(mooncake.ep.__file__))
# The multi-process tests are about the portable path on CPU tensors: hide any GPU from the ranks
# (on a GPU machine a Buffer with a buffer size would take the fast path).
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def _errors(values: list) -> list[str]:
    return [e for v in values for e in v["errors"]]


@pytest.mark.timeout(150)
def test_active_ranks_longer_than_the_group() -> None:
    values = assert_all_ok(
        run_world(2, "ep_client_cases:run_long_active_ranks", (), timeout=140, env=CPU_ONLY)
    )
    errors = _errors(values)
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(150)
def test_long_active_ranks_receives_a_failure() -> None:
    pytest.importorskip("mooncake.pg", reason="the fault needs the Mooncake backend")
    world = start_world(
        3, "ep_client_cases:run_long_active_ranks_kill", (), backend="mooncake-cpu", env=CPU_ONLY
    )
    results = world.results(140)
    victim = results[-1]
    assert victim.exitcode == -9, f"the victim did not die by SIGKILL: {victim.error[-2000:]}"
    errors = _errors(assert_all_ok(results[:-1]))
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(150)
def test_group_size_use_fallback_and_a_second_buffer_meeting_update() -> None:
    values = assert_all_ok(
        run_world(2, "ep_client_cases:run_attributes_and_rebuild", (), timeout=140, env=CPU_ONLY)
    )
    errors = _errors(values)
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(150)
def test_update_falls_back_when_the_fast_path_is_gone() -> None:
    target = "ep_client_cases:run_fast_path_gone_at_update"
    values = assert_all_ok(run_world(3, target, (), timeout=140, env=CPU_ONLY))
    errors = _errors(values)
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(150)
def test_deep_ep_mask_api_on_two_processes() -> None:
    values = assert_all_ok(
        run_world(2, "ep_client_cases:run_mask_api", (), timeout=140, env=CPU_ONLY)
    )
    errors = _errors(values)
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(150)
def test_default_device_meta_two_ranks() -> None:
    values = assert_all_ok(
        run_world(2, "ep_client_cases:run_default_device", ("meta",), timeout=140, env=CPU_ONLY)
    )
    errors = _errors(values)
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(60)
def test_deep_ep_module_names() -> None:
    assert deep_ep_compat.topk_idx_t is torch.int64
    namespace: dict = {}
    exec("from mooncake.ep.deep_ep_compat import *", namespace)
    assert {"Buffer", "EventOverlap", "topk_idx_t"} <= set(namespace)
    for name in (
        "low_latency_query_mask_buffer",
        "low_latency_update_mask_buffer",
        "low_latency_clean_mask_buffer",
        "get_next_low_latency_combine_buffer",
        "clean_low_latency_buffer",
        "destroy",
        "capture",
    ):
        assert callable(getattr(deep_ep_compat.Buffer, name)), name
    params = list(deep_ep_compat.Buffer.__init__.__code__.co_varnames)
    assert "enable_shrink" in params
    assert "use_fabric" in params


@pytest.mark.timeout(60)
def test_classic_ep_module_reexports_pg() -> None:
    pg = pytest.importorskip("mooncake.pg")
    from mooncake import ep

    for name in (
        "get_active_ranks",
        "get_peer_state",
        "recover_ranks",
        "join_group",
        "extend_group_size_to",
        "MooncakeBackendOptions",
        "op_timeout",
        *pg.__all__,
    ):
        assert getattr(ep, name) is getattr(pg, name), name
    assert "get_active_ranks" in dir(ep)
    with pytest.raises(AttributeError, match="no attribute 'timedelta'"):
        ep.timedelta  # noqa: B018 - pg imports it; it is not part of pg's API
    with pytest.raises(AttributeError, match="no_such_name"):
        ep.no_such_name  # noqa: B018
    assert ep.Buffer is mooncake.ep.buffer.Buffer


@pytest.mark.timeout(120)
def test_classic_ep_module_loads_pg_lazily() -> None:
    code = (
        "import sys\n"
        "import mooncake.ep\n"
        "from mooncake.ep import layout, limits, fast_path_setup\n"
        "assert 'mooncake.pg' not in sys.modules, 'mooncake.pg imported too early'\n"
        "from mooncake import ep\n"
        "ep.get_active_ranks\n"
        "assert 'mooncake.pg' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# Functions that place their result on torch's default device unless given one.
_CONSTRUCTORS = {
    "empty", "empty_permuted", "empty_strided", "ones", "zeros", "full", "arange", "range",
    "tensor", "as_tensor", "asarray", "scalar_tensor", "rand", "randn", "randint", "randperm",
    "linspace", "logspace", "eye", "tril_indices", "triu_indices",
}  # fmt: skip


@pytest.mark.timeout(60)
def test_every_allocation_names_its_device() -> None:
    """Clients run under ``torch.set_default_device("cuda")``: no tensor the package makes may
    follow it (a static check of every ``torch.<constructor>(...)`` call in the sources)."""
    missing = []
    for folder, _, files in os.walk(SRC):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _CONSTRUCTORS
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)
                ):
                    missing.append(
                        f"{os.path.relpath(path, SRC)}:{node.lineno} torch.{node.func.attr}"
                    )
    assert not missing, "allocations without device=: " + ", ".join(missing)


# ---------------------------------------------------------------------------- host path


class _CountTorchFunctions(torch.overrides.TorchFunctionMode):
    """Counts the calls that reach Python ``__torch_function__`` handling (what a client's
    ``torch.set_default_device`` mode costs per tensor attribute read)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.timeout(60)
def test_steady_state_ops_run_outside_torch_function_modes() -> None:
    """DeepEP's and Mooncake's tests call ``torch.set_default_device("cuda")``: a mode through which
    every tensor attribute read and method call goes. The steady-state dispatch + combine (FP8 with
    cumulative stats, through ``Buffer`` and through the DeepEP drop-in) must not hit it once; on
    the fast path's real glue (launches stubbed) this was 55 calls per pair, about 55 us of host
    time on these machines."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_host_overhead as bench

    from mooncake.ep import fast_path

    saved = fast_path._current_raw_stream, fast_path._stream_capturing  # _glue_path stubs them
    try:
        _count_steady_state(bench)
    finally:
        fast_path._current_raw_stream, fast_path._stream_capturing = saved


def _count_steady_state(bench: Any) -> None:
    T, H, K, E, R, dev = bench.T, bench.H, bench.K, bench.E, bench.R, bench.DEV
    buffer = bench._buffer(bench._glue_path())
    compat = deep_ep_compat.Buffer.__new__(deep_ep_compat.Buffer)
    active = torch.ones((R + 7,), dtype=torch.int32, device=dev)  # longer than R, as SGLang's
    compat.__dict__.update(
        _buffer=buffer, group=None, rank=0, group_size=R, timeout_us=-1, _active_ranks=active,
        _warned_logfmt=False,
    )  # fmt: skip
    x = torch.empty((T, H), dtype=torch.bfloat16, device=dev)
    topk = torch.empty((T, K), dtype=torch.int64, device=dev)
    weights = torch.empty((T, K), dtype=torch.float32, device=dev)
    stats = torch.zeros((E // R,), dtype=torch.int32, device=dev)
    expert_out = torch.empty((E // R, R * T, H), dtype=torch.bfloat16, device=dev)

    def direct() -> None:
        recv = buffer.dispatch(x, topk, active, T, E, -1, cumulative_local_expert_recv_stats=stats)
        buffer.combine(expert_out, topk, weights, active, -1, recv[2])

    def through_compat() -> None:
        recv = compat.low_latency_dispatch(x, topk, T, E, cumulative_local_expert_recv_stats=stats)
        compat.low_latency_combine(expert_out, topk, weights, recv[2], use_logfmt=False)

    for pair in (direct, through_compat):
        pair()  # first sight of the signature: full validation
        pair()
        with _CountTorchFunctions() as counter:
            for _ in range(3):
                pair()
        assert counter.calls == 0, f"{pair.__name__}: {counter.calls} calls in 3 pairs"
    assert buffer.num_ops == 20  # 10 pairs


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2])
def test_fast_path_as_clients_drive_it(world_size: int) -> None:
    reason = fast_path_unusable_reason()
    if reason:
        pytest.skip(f"CUDA fast path not runnable here: {reason}")
    values = assert_all_ok(
        run_world(
            world_size, "ep_client_cases:run_fast_path_client", (), backend="gloo", timeout=280
        )
    )
    errors = _errors(values)
    assert not errors, "\n".join(errors)
