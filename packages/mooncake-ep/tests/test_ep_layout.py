"""The fast path's buffer layout: disjoint aligned regions, an upper bound for every option."""

from __future__ import annotations

import itertools

import pytest

from mooncake.ep.layout import (
    REGION_ALIGNMENT,
    dispatch_msg_bytes,
    ep_buffer_layout,
    ep_buffer_size_hint,
)
from mooncake.ep.limits import MAX_TOPK


@pytest.mark.parametrize(
    ("T", "H", "R", "E"),
    [(128, 7168, 8, 288), (1, 128, 1, 1), (1024, 640, 3, 9), (17, 2560, 5, 40)],
)
def test_regions_disjoint_aligned_and_inside(T: int, H: int, R: int, E: int) -> None:
    layout = ep_buffer_layout(T, H, R, E)
    regions = [("control", layout.control)]
    for half in layout.halves:
        regions += [
            (f"{name}{half.index}", getattr(half, name))
            for name in (
                "dispatch_send",
                "dispatch_recv",
                "dispatch_signals",
                "combine_send",
                "combine_recv",
                "combine_signals",
            )
        ]
    spans = sorted((r.offset, r.end, name) for name, r in regions)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        assert end_a <= start_b, f"{a} overlaps {b}"
    assert all(r.offset % REGION_ALIGNMENT == 0 for _, r in regions)
    assert spans[-1][1] <= layout.total_bytes == ep_buffer_size_hint(T, H, R, E)
    L = E // R
    h0, h1 = layout.halves
    assert h0.dispatch_recv.nbytes == R * T * dispatch_msg_bytes(H) + L * R * T * 8
    assert h0.combine_send.nbytes == L * R * T * H * 2
    assert h0.combine_recv.nbytes == T * MAX_TOPK * H * 2
    assert h1.dispatch_recv.nbytes == h0.dispatch_recv.nbytes
    assert layout.half(0) is h0
    assert layout.half(3) is h1


def test_message_bounds_every_option() -> None:
    for H in (128, 640, 7168):
        msg = dispatch_msg_bytes(H)
        assert msg >= 16 + 2 * H  # BF16
        assert msg >= 16 + H + (H // 128) * 4  # FP8 + float32 scales
        assert msg % 16 == 0


def test_hint_grows_with_every_dimension() -> None:
    base = ep_buffer_size_hint(64, 1024, 4, 16)
    for args in itertools.starmap(
        lambda i, v: tuple(v if j == i else b for j, b in enumerate((64, 1024, 4, 16))),
        [(0, 128), (1, 2048), (3, 32)],
    ):
        assert ep_buffer_size_hint(*args) > base


def test_limits() -> None:
    with pytest.raises(ValueError, match="1024"):
        ep_buffer_layout(1025, 128, 1, 1)
    with pytest.raises(ValueError, match="multiple of 128"):
        ep_buffer_layout(1, 129, 1, 1)
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        ep_buffer_layout(1, 128, 3, 4)
