"""Bad inputs: a clear error naming argument and limit on every rank; nothing sent, no hang."""

from __future__ import annotations

import pytest
import torch
from ep_harness import assert_all_ok, run_world

from mooncake.ep.limits import check_topk_values
from mooncake.mooncake_ep_buffer import Buffer


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2])
def test_bad_inputs_every_rank(world_size: int) -> None:
    values = assert_all_ok(run_world(world_size, "ep_cases:run_bad_inputs", (), timeout=110))
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors)
    # Nothing was sent, so nothing waited: all 30 bad calls and the good round take well under a
    # second.
    assert all(v["elapsed"] < 10 for v in values)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [2, 3])
def test_one_bad_rank_every_rank_raises(world_size: int) -> None:
    """A limit violated on one rank only: every rank raises before anything is sent (the others a
    PeerArgumentError naming the rank and the limit), nobody is marked failed, the next op works."""
    values = assert_all_ok(run_world(world_size, "ep_cases:run_one_bad_rank", (), timeout=140))
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors)
    assert len(values[0]["elapsed"]) == (6 if world_size == 2 else 7)


@pytest.mark.timeout(120)
def test_validation_cache_catches_every_change() -> None:
    """The steady state skips re-checking a validated signature; any change is checked in full."""
    values = assert_all_ok(run_world(2, "ep_cases:run_validation_cache", (), timeout=110))
    errors = [e for v in values for e in v["errors"]]
    assert not errors, "\n".join(errors)


def test_constructor_rejects_non_group() -> None:
    with pytest.raises(TypeError, match="ProcessGroup"):
        Buffer("not a group")  # type: ignore[arg-type]


def test_size_hint_alias_and_limits() -> None:
    assert Buffer.get_buffer_size_hint(128, 7168, 4, 288) == Buffer.get_ep_buffer_size_hint(
        128, 7168, 4, 288
    )
    with pytest.raises(ValueError, match="hidden=100"):
        Buffer.get_ep_buffer_size_hint(128, 100, 4, 288)
    with pytest.raises(ValueError, match="num_experts=290"):
        Buffer.get_ep_buffer_size_hint(128, 7168, 4, 290)
    with pytest.raises(TypeError, match="num_max_dispatch_tokens_per_rank must be an int"):
        Buffer.get_ep_buffer_size_hint(128.0, 7168, 4, 288)  # type: ignore[arg-type]


def test_topk_value_checks() -> None:
    check_topk_values(torch.tensor([[0, 3, -1], [-1, -1, -1]]), 4)
    with pytest.raises(ValueError, match="entry 4"):
        check_topk_values(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="row 1 lists an expert twice"):
        check_topk_values(torch.tensor([[0, 1], [2, 2]]), 4)
    check_topk_values(torch.tensor([[-1, -1]]), 4)  # repeated -1 is fine
