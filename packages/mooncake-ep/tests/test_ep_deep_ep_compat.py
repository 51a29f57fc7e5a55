"""DeepEP drop-in: a DeepEP low-latency test body runs with only the import changed."""

from __future__ import annotations

import inspect

import pytest
from ep_harness import assert_all_ok, run_world

from mooncake.ep import deep_ep_compat as deep_ep


@pytest.mark.timeout(120)
def test_deep_ep_script_runs_unchanged() -> None:
    values = assert_all_ok(run_world(2, "ep_cases:run_deep_ep_script", (), timeout=110))
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors)


def test_signatures_match_deep_ep() -> None:
    def names(fn):
        return list(inspect.signature(fn).parameters)[1:]

    assert names(deep_ep.Buffer.__init__)[:8] == [
        "group",
        "num_nvl_bytes",
        "num_rdma_bytes",
        "low_latency_mode",
        "num_qps_per_rank",
        "allow_nvlink_for_low_latency_mode",
        "allow_mnnvl",
        "explicitly_destroy",
    ]
    assert names(deep_ep.Buffer.low_latency_dispatch) == [
        "x",
        "topk_idx",
        "num_max_dispatch_tokens_per_rank",
        "num_experts",
        "cumulative_local_expert_recv_stats",
        "dispatch_wait_recv_cost_stats",
        "use_fp8",
        "round_scale",
        "use_ue8m0",
        "async_finish",
        "return_recv_hook",
    ]
    assert names(deep_ep.Buffer.low_latency_combine) == [
        "x",
        "topk_idx",
        "topk_weights",
        "handle",
        "use_logfmt",
        "zero_copy",
        "async_finish",
        "return_recv_hook",
        "out",
        "combine_wait_recv_cost_stats",
    ]
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288) > 0
    assert hasattr(deep_ep, "EventOverlap")
