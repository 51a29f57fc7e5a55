"""Layout of the fast path's symmetric buffer (pure arithmetic, no torch, no CUDA).

Every rank allocates the same number of bytes (``ep_buffer_size_hint``) and places the same regions
at the same offsets, so a peer's region address is ``peer_base + region.offset``. Both paths and
``Buffer.get_ep_buffer_size_hint`` use this module; it is the single definition of the layout.

Notation: ``T`` tokens per rank (max), ``H`` hidden, ``R`` ranks, ``E`` experts, ``L = E / R``.

```
offset 0            control           int64 words [CONTROL_WORDS_PER_RANK * R], rounded up
half 0              HalfLayout        (dispatch and combine areas below)
half 1              HalfLayout        same sizes as half 0
total               ep_buffer_size_hint(T, H, R, E)
```

Each half (every dispatch and every combine flips to the other half; results of at most two ops
are alive at once):

| region | shape | written by | meaning |
| --- | --- | --- | --- |
| ``dispatch_send`` | ``[T, msg]`` B | this rank | its tokens, cast once (FP8 or BF16) |
| ``dispatch_recv`` | ``[R, T, msg]`` B + int64 ``[L, R, T]`` | source ``r`` | see below |
| ``dispatch_signals`` | int64 ``[L, R]`` | source ``r`` | tokens of ``r`` for ``l`` are complete |
| ``combine_send`` | bf16 ``[L, R*T, H]`` | this rank | expert outputs (zero-copy buffer) |
| ``combine_recv`` | bf16 ``[T, MAX_TOPK, H]`` | expert owner | row ``(n, k)``: token, slot |
| ``combine_signals`` | int64 ``[E]`` | owner of ``e`` | expert ``e``'s rows are all in |

``dispatch_recv`` holds one message per (source ``r``, token ``n``) at ``[r, n]`` (a token is sent
once to each rank that owns any of its experts, however many of them it selected there), then the
index table: int64 ``(l, r, i)`` = ``n | k << 32`` for source ``r``'s ``i``-th row for local expert
``l`` (token ``n``, its top-k slot ``k``); the receiver expands messages into expert rows by it.

A dispatch message (``msg = dispatch_msg_bytes(H)`` bytes, 16-byte aligned) is
``[header 16 B | payload]``: header int32 ``(src_token_index, topk_slot_k, 0, 0)``; payload either
BF16 ``[H]`` (``2H`` bytes) or FP8 ``[H]`` followed by the scales (float32 ``[H/128]``, or the
``H/128`` UE8M0 exponent bytes). The message size is the BF16 size, which bounds every FP8 variant,
so one layout serves every option. Signal words should carry a sequence number (for example
``(op_sequence << 32) | (count + 1)``) so a stale signal from an earlier op is never taken as new.
"""

from __future__ import annotations

from dataclasses import dataclass

from .limits import MAX_TOPK, check_shape_limits

REGION_ALIGNMENT = 256  # bytes: every region starts on this boundary (128-bit vector access, TMA)
DISPATCH_HEADER_BYTES = 16  # int32 src_token_index, int32 topk_slot_k, two reserved int32
MESSAGE_ALIGNMENT = 16
SIGNAL_BYTES = 8  # one int64 per signal word
INDEX_BYTES = 8  # one int64 index word per dispatched row (token | k << 32)
CONTROL_WORDS_PER_RANK = 4  # int64 words per peer for barriers / sequence numbers
BF16_BYTES = 2
FP32_BYTES = 4


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def dispatch_msg_bytes(hidden: int) -> int:
    """Bytes of one dispatch message: header + the largest payload (BF16) over all options."""
    bf16_payload = hidden * BF16_BYTES
    fp8_payload = hidden + (hidden // 128) * FP32_BYTES
    return _align(DISPATCH_HEADER_BYTES + max(bf16_payload, fp8_payload), MESSAGE_ALIGNMENT)


@dataclass(frozen=True)
class Region:
    """``nbytes`` bytes at ``offset`` from the start of the symmetric buffer."""

    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class HalfLayout:
    """The regions of one half (absolute offsets). See the module docstring for each region."""

    index: int
    dispatch_send: Region
    dispatch_recv: Region
    dispatch_signals: Region
    combine_send: Region
    combine_recv: Region
    combine_signals: Region

    @property
    def start(self) -> int:
        return self.dispatch_send.offset

    @property
    def end(self) -> int:
        return self.combine_signals.end


@dataclass(frozen=True)
class EPBufferLayout:
    """The whole symmetric buffer for ``(T, H, R, E)``."""

    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_ranks: int
    num_experts: int
    num_local_experts: int
    msg_bytes: int
    control: Region
    halves: tuple[HalfLayout, HalfLayout]
    total_bytes: int

    def half(self, op_index: int) -> HalfLayout:
        """The half used by the op with this index (ops count dispatches and combines together)."""
        return self.halves[op_index % 2]


def _half_layout(
    index: int, start: int, tokens: int, hidden: int, ranks: int, experts: int
) -> HalfLayout:
    local_experts = experts // ranks
    msg = dispatch_msg_bytes(hidden)
    sizes = (
        ("dispatch_send", tokens * msg),
        ("dispatch_recv", ranks * tokens * msg + local_experts * ranks * tokens * INDEX_BYTES),
        ("dispatch_signals", local_experts * ranks * SIGNAL_BYTES),
        ("combine_send", local_experts * ranks * tokens * hidden * BF16_BYTES),
        ("combine_recv", tokens * MAX_TOPK * hidden * BF16_BYTES),
        ("combine_signals", experts * SIGNAL_BYTES),
    )
    regions = {}
    offset = start
    for name, nbytes in sizes:
        offset = _align(offset, REGION_ALIGNMENT)
        regions[name] = Region(offset, nbytes)
        offset += nbytes
    return HalfLayout(index=index, **regions)


def ep_buffer_layout(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> EPBufferLayout:
    """Offsets of every region for ``(T, H, R, E)``; raises ValueError on a violated limit."""
    check_shape_limits(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
    tokens, ranks, experts = num_max_dispatch_tokens_per_rank, num_ranks, num_experts
    control = Region(0, _align(CONTROL_WORDS_PER_RANK * SIGNAL_BYTES * ranks, REGION_ALIGNMENT))
    half0 = _half_layout(0, control.end, tokens, hidden, ranks, experts)
    half1 = _half_layout(1, _align(half0.end, REGION_ALIGNMENT), tokens, hidden, ranks, experts)
    total = _align(half1.end, REGION_ALIGNMENT)
    return EPBufferLayout(
        num_max_dispatch_tokens_per_rank=tokens,
        hidden=hidden,
        num_ranks=ranks,
        num_experts=experts,
        num_local_experts=experts // ranks,
        msg_bytes=dispatch_msg_bytes(hidden),
        control=control,
        halves=(half0, half1),
        total_bytes=total,
    )


def ep_buffer_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of the symmetric buffer: an upper bound for BF16 and FP8, both halves included."""
    return ep_buffer_layout(
        num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
    ).total_bytes
