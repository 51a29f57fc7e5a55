"""The kernel interface's argument block, ``MepOpArgs`` (``csrc/ep_args.h``), on the CPU.

- Python's ``ctypes`` mirror (``mooncake.ep._cuda.MepOpArgs``) lists the header's fields and
  constants, in order, with the same C types (read from the header's X-macro: no build needed);
- whenever the CUDA library is built (CI has nvcc, no GPU: it loads without a device), its layout
  description and hash equal Python's, and ``load()`` refuses one whose hash differs, with an error
  naming both hashes and the library; the benchmark library is separate and the production one
  exports none of its symbols;
- the fast path's glue (``CudaP2PPath``, launches replaced by a recorder, CPU tensors standing in
  for CUDA ones) fills every field of every launch as the header defines it: dispatch, its receive
  hook, combine, the runners, and the retry with fresh outputs under graph capture.
"""

from __future__ import annotations

import ctypes
import os
import re
import weakref
from typing import Any, Optional

import pytest
import torch

from mooncake.ep import _cuda, fast_path
from mooncake.ep.layout import ep_buffer_layout, ep_buffer_size_hint

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(PACKAGE, "csrc", "ep_args.h")


def _library() -> tuple[Optional[ctypes.CDLL], str]:
    """(the loaded production library, why not): absent only where the package was built
    without nvcc (or the library cannot be loaded on this machine)."""
    path = _cuda.library_path()
    if not os.path.exists(path):
        return None, f"{path} is not built (no nvcc when the package was installed)"
    return _cuda.load(), ""


def _header_macro(name: str) -> str:
    with open(HEADER) as f:
        text = f.read()
    m = re.search(rf"#define {name}\(X\)(.*?)\n\n", text, re.S)
    assert m, f"{name} not found in {HEADER}"
    return re.sub(r"/\*.*?\*/", "", m.group(1).replace("\\\n", "\n"), flags=re.S)


# ---------------------------------------------------------------------------- no build needed


@pytest.mark.timeout(30)
def test_python_mirror_matches_the_header() -> None:
    fields = re.findall(r"X\((\w+), (\w+), ", _header_macro("MEP_OP_ARGS_FIELDS"))
    names = {ctypes.c_uint64: "uint64_t", ctypes.c_int64: "int64_t", ctypes.c_int32: "int32_t"}
    mirror = [(names[t], n) for n, t in _cuda.MepOpArgs._fields_]
    assert mirror == fields
    constants = re.findall(r"X\((\w+), (\d+)\)", _header_macro("MEP_OP_ARGS_CONSTANTS"))
    assert [(n, int(v)) for n, v in constants] == list(_cuda.CONSTANTS.items())
    # the description's format (the header's args_layout_description builds the same string)
    desc = _cuda.ARGS_LAYOUT
    assert desc.startswith(f"MepOpArgs/{ctypes.sizeof(_cuda.MepOpArgs)}/8;cum_stats:uint64_t:0:8;")
    assert ";#MEP_FLAG_CACHED_OUTPUTS=8;" in desc
    assert _cuda.layout_hash(desc) == _cuda.ARGS_LAYOUT_HASH


@pytest.mark.timeout(30)
def test_layout_hash_covers_order_types_and_constants() -> None:
    base = _cuda.ARGS_LAYOUT_HASH
    fields = list(_cuda.MepOpArgs._fields_)

    def variant(new_fields: list) -> int:
        cls = type("MepOpArgs", (ctypes.Structure,), {"_fields_": new_fields})
        return _cuda.layout_hash(_cuda.layout_description(cls))

    assert variant(fields) == base
    swapped = fields[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert variant(swapped) != base  # two pointers exchanged: same size, other names at offsets
    retyped = [(n, ctypes.c_int64 if n == "stream" else t) for n, t in fields]
    assert variant(retyped) != base  # signedness
    assert variant(fields[:-1]) != base  # a field fewer
    other = dict(_cuda.CONSTANTS, MEP_FLAG_CACHED_OUTPUTS=16)
    assert _cuda.layout_hash(_cuda.layout_description(constants=other)) != base
    # FNV-1a 64 reference values (the C side's fnv1a64)
    assert _cuda.layout_hash("") == 0xCBF29CE484222325
    assert _cuda.layout_hash("a") == 0xAF63DC4C8601EC8C


@pytest.mark.timeout(30)
def test_check_layout_names_both_hashes_and_the_library() -> None:
    _cuda.check_layout("/x/lib.so", _cuda.ARGS_LAYOUT_HASH, None)  # equal: nothing to say
    theirs = _cuda.ARGS_LAYOUT.replace("stream:uint64_t:8", "stream:int64_t:8")
    with pytest.raises(_cuda.ArgsLayoutMismatch) as info:
        _cuda.check_layout("/x/lib.so", _cuda.layout_hash(theirs), theirs)
    text = str(info.value)
    assert "/x/lib.so" in text
    assert f"0x{_cuda.layout_hash(theirs):016x}" in text
    assert f"0x{_cuda.ARGS_LAYOUT_HASH:016x}" in text
    assert "'stream:int64_t:8:8'" in text
    assert "'stream:uint64_t:8:8'" in text
    assert isinstance(info.value, OSError)  # probe() reports it as "the CUDA library is not usable"


@pytest.mark.timeout(30)
def test_packer_needs_consecutive_fields() -> None:
    pack, at = _cuda.packer("num_tokens", "topk", "flags")
    args = _cuda.MepOpArgs()
    pack.pack_into(args, at, 7, 3, 9)
    assert (args.num_tokens, args.topk, args.flags) == (7, 3, 9)
    with pytest.raises(TypeError, match="not packable"):
        _cuda.packer("stream", "topk_idx")  # x is between them
    with pytest.raises(TypeError, match="not packable"):
        _cuda.packer("cum_stats", "x")  # stream is between them


# ---------------------------------------------------------------------------- the built library


@pytest.mark.timeout(60)
def test_library_layout_equals_python(monkeypatch: pytest.MonkeyPatch) -> None:
    lib, why = _library()
    if lib is None:
        pytest.skip(why)
    assert lib.mep_args_layout().decode() == _cuda.ARGS_LAYOUT
    assert lib.mep_args_layout_hash() == _cuda.ARGS_LAYOUT_HASH
    assert lib.mep_abi_version() == _cuda.ABI_VERSION


@pytest.mark.timeout(60)
def test_load_refuses_a_library_with_another_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    lib, why = _library()
    if lib is None:
        pytest.skip(why)
    # This package's expectation changes (as after an edit of MepOpArgs without a rebuild).
    changed = _cuda.ARGS_LAYOUT.replace("timeout_us:int64_t", "timeout_us:uint64_t")
    monkeypatch.setattr(_cuda, "ARGS_LAYOUT", changed)
    monkeypatch.setattr(_cuda, "ARGS_LAYOUT_HASH", _cuda.layout_hash(changed))
    monkeypatch.setattr(_cuda, "_lib", None)
    path = _cuda.library_path()
    with pytest.raises(_cuda.ArgsLayoutMismatch) as info:
        _cuda.load()
    text = str(info.value)
    assert path in text
    assert f"0x{lib.mep_args_layout_hash():016x}" in text  # the library's
    assert f"0x{_cuda.layout_hash(changed):016x}" in text  # ours
    assert "timeout_us" in text
    assert _cuda._lib is None  # nothing cached: a refused library is never used
    # ... and the fast path's probe turns it into its reason (the portable path serves)
    from mooncake.ep import fast_path_setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = fast_path_setup.probe(1 << 20)["reason"]
    assert reason.startswith("the CUDA library is not usable")
    assert "layout hash" in reason


@pytest.mark.timeout(60)
def test_bench_launcher_is_its_own_library() -> None:
    lib, why = _library()
    if lib is None:
        pytest.skip(why)
    assert not hasattr(lib, "mep_bench_launch")  # the production library has no bench code
    for name in ("mep_dispatch_num_args", "mep_combine_num_args"):
        assert not hasattr(lib, name)  # the positional vectors' size queries are gone
    bench_path = _cuda.bench_library_path()
    assert os.path.dirname(bench_path) == os.path.dirname(os.path.abspath(_cuda.library_path()))
    assert os.path.exists(bench_path), f"{bench_path} is built with the production library"
    bench = _cuda.load_bench()
    assert bench.mep_bench_args_layout_hash() == _cuda.ARGS_LAYOUT_HASH
    assert hasattr(bench, "mep_bench_launch")


# ---------------------------------------------------------------------------- the glue's fields

T, H, K, E, R = 8, 256, 3, 8, 1
STREAM = 0x5151


class _Recorder:
    """Stands in for mep_dispatch / mep_combine: copies each launch's MepOpArgs; answers ``rcs``
    in turn (then 0)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, _cuda.MepOpArgs]] = []
        self.rcs: list[int] = []

    def fn(self, kind: str) -> Any:
        def launch(ctx: Any, ref: Any) -> int:
            assert isinstance(ctx, ctypes.c_void_p)
            assert ctx.value == 1
            self.calls.append((kind, _cuda.MepOpArgs.from_buffer_copy(ref._obj)))
            return self.rcs.pop(0) if self.rcs else 0

        return launch


def _glue(monkeypatch: pytest.MonkeyPatch, recorder: _Recorder) -> Any:
    monkeypatch.setattr(fast_path, "_current_raw_stream", lambda index: STREAM)
    monkeypatch.setattr(fast_path, "_stream_capturing", lambda: False)
    path = fast_path.CudaP2PPath.__new__(fast_path.CudaP2PPath)
    path.__dict__.update(
        rank=0, num_ranks=R, device=torch.device("cpu"), _device_index=-1, grid=5, num_ops=0,
        _lib=None, _ctx=1, _ctx_arg=ctypes.c_void_p(1), _nbytes=ep_buffer_size_hint(T, H, R, E),
        _transport=_cuda.TRANSPORT_PROXY, reason="test",
        _buffer=torch.zeros(ep_buffer_size_hint(T, H, R, E), dtype=torch.uint8), _layouts={},
        _dispatch_fn=recorder.fn("dispatch"), _combine_fn=recorder.fn("combine"),
        _comm_stream=None, _reuse_outputs=True, _outputs={}, _dispatch_entries={},
        _combine_argvs={}, _out_views={}, _slot_rows=weakref.WeakValueDictionary(),
        _own_src_info={},
    )  # fmt: skip
    path.destroy = lambda: None
    return path


def _shape_fields(args: _cuda.MepOpArgs, half: int) -> None:
    lay = ep_buffer_layout(T, H, R, E)
    h = lay.halves[half]
    assert (args.max_tokens, args.hidden, args.num_experts, args.half) == (T, H, E, half)
    assert (args.transport, args.grid) == (_cuda.TRANSPORT_PROXY, 5)
    assert args.off_dispatch_send == h.dispatch_send.offset
    assert args.off_dispatch_recv == h.dispatch_recv.offset
    assert args.off_dispatch_signals == h.dispatch_signals.offset
    assert args.off_combine_send == h.combine_send.offset
    assert args.off_combine_recv == h.combine_recv.offset
    assert args.off_combine_signals == h.combine_signals.offset
    assert args.off_control == lay.control.offset


@pytest.mark.timeout(60)
def test_glue_fills_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    path = _glue(monkeypatch, rec)
    n = 6
    x = torch.zeros((n, H), dtype=torch.bfloat16)
    topk = torch.zeros((n, K), dtype=torch.int64)
    weights = torch.zeros((n, K), dtype=torch.float32)
    active = torch.ones((R,), dtype=torch.int32)
    stats = torch.zeros((E // R,), dtype=torch.int32)
    fp8, cached = _cuda.FLAG_FP8 | _cuda.FLAG_ROUND_SCALE, _cuda.FLAG_CACHED_OUTPUTS

    # dispatch with a receive hook: the send phase, then the receive phase from its own copy
    recv_x, recv_count, handle, _, hook = path.dispatch(
        x, topk, active, T, E, 1234, True, True, False, False, True, stats
    )
    kind, d = rec.calls[-1]
    assert kind == "dispatch"
    assert (d.stream, d.x, d.topk_idx, d.active_ranks) == (
        STREAM, x.data_ptr(), topk.data_ptr(), active.data_ptr()
    )  # fmt: skip
    assert (d.timeout_us, d.num_tokens, d.topk, d.flags, d.phases) == (
        1234, n, K, fp8 | cached, _cuda.PHASE_SEND
    )  # fmt: skip
    assert d.cum_stats == stats.data_ptr()
    assert (d.recv_x, d.recv_scales, d.recv_count) == (
        recv_x[0].data_ptr(), recv_x[1].data_ptr(), recv_count.data_ptr()
    )  # fmt: skip
    assert (d.src_info, d.layout_range) == (handle[0].data_ptr(), handle[1].data_ptr())
    assert d.msg_bytes == ep_buffer_layout(T, H, R, E).msg_bytes
    _shape_fields(d, 0)
    hook()
    kind, r = rec.calls[-1]
    assert kind == "dispatch"
    assert r.phases == _cuda.PHASE_RECV
    assert r.flags == fp8
    common = slice(_cuda.MepOpArgs.x.offset, _cuda.MepOpArgs.flags.offset)  # x .. num_tokens, topk
    assert bytes(r)[common] == bytes(d)[common]
    assert r.recv_x == d.recv_x

    # combine into the cached output, on the other half
    out, _, _ = path.combine(
        torch.zeros((E // R, R * T, H), dtype=torch.bfloat16), topk, weights, active, -1, handle,
        False, False, False, None,
    )  # fmt: skip
    kind, c = rec.calls[-1]
    assert kind == "combine"
    assert (c.stream, c.topk_idx, c.active_ranks, c.topk_weights, c.out) == (
        STREAM, topk.data_ptr(), active.data_ptr(), weights.data_ptr(), out.data_ptr()
    )  # fmt: skip
    assert (c.src_info, c.layout_range, c.cum_stats) == (
        handle[0].data_ptr(), handle[1].data_ptr(), 0
    )  # fmt: skip
    assert (c.timeout_us, c.num_tokens, c.topk, c.flags, c.phases) == (
        -1, n, K, cached, _cuda.PHASE_SEND | _cuda.PHASE_RECV
    )  # fmt: skip
    _shape_fields(c, 1)

    # zero copy reads this half's combine_send region; an explicit out is not cached
    mine = torch.empty((n, H), dtype=torch.bfloat16)
    path.combine(None, topk, weights, active, 7, handle, True, False, False, mine)
    _, z = rec.calls[-1]
    half = ep_buffer_layout(T, H, R, E).halves[0]
    assert z.x == path._buffer.data_ptr() + half.combine_send.offset
    assert (z.out, z.flags, z.half) == (mine.data_ptr(), 0, 0)

    # the runners (Buffer's steady state) write the same fields
    run = path.dispatch_runner(x, topk, active, T, E, False, False, False, False, False, None)
    run(x, topk, active, 99, None)
    _, d2 = rec.calls[-1]
    assert (d2.x, d2.timeout_us, d2.flags, d2.cum_stats, d2.half) == (
        x.data_ptr(), 99, cached, 0, 1
    )  # fmt: skip
    assert d2.recv_scales == 0  # bf16
    run_c = path.combine_runner(x, topk, weights, active, handle, False, False, False, None)
    expert_out = torch.zeros((E // R, R * T, H), dtype=torch.bfloat16)
    out2 = run_c(expert_out, topk, weights, active, 5, handle, None)[0]
    _, c2 = rec.calls[-1]
    assert (c2.x, c2.out, c2.timeout_us, c2.half) == (
        expert_out.data_ptr(), out2.data_ptr(), 5, 0
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_capture_retry_keeps_the_per_call_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library refuses cached outputs under graph capture (CAPTURING): the op is issued again
    with fresh outputs, the same per-call fields and the cached flag cleared."""
    rec = _Recorder()
    path = _glue(monkeypatch, rec)
    x = torch.zeros((T, H), dtype=torch.bfloat16)
    topk = torch.zeros((T, K), dtype=torch.int64)
    active = torch.ones((R,), dtype=torch.int32)
    rec.rcs = [_cuda.CAPTURING]
    recv_x, _, handle, _, _ = path.dispatch(
        x, topk, active, T, E, 77, False, False, False, False, False, None
    )
    (_, first), (_, again) = rec.calls
    assert first.flags == _cuda.FLAG_CACHED_OUTPUTS
    assert again.flags == 0
    flags, end = _cuda.MepOpArgs.flags.offset, _cuda.MepOpArgs.topk_weights.offset
    assert bytes(again)[:flags] == bytes(first)[:flags]  # cum_stats .. topk
    assert bytes(again)[flags + 4 : end] == bytes(first)[flags + 4 : end]  # phases
    assert again.recv_x == recv_x.data_ptr() != first.recv_x
    assert again.src_info == handle[0].data_ptr() != first.src_info
    rec.calls.clear()
    rec.rcs = [_cuda.CAPTURING]
    weights = torch.zeros((T, K), dtype=torch.float32)
    out, _, _ = path.combine(recv_x, topk, weights, active, 77, handle, False, False, False, None)
    (_, first), (_, again) = rec.calls
    assert first.flags == _cuda.FLAG_CACHED_OUTPUTS
    assert again.flags == 0
    assert again.out == out.data_ptr() != first.out
    assert (again.x, again.src_info, again.timeout_us) == (first.x, first.src_info, 77)
