"""The backend's reductions and copies run natively (issue 13): bit-identical to torch's binary
ops folded in member order, and without calling torch's (multi-threaded) kernels."""

from __future__ import annotations

import pytest
import torch

from mooncake.backend import native
from mooncake.backend.reduce_ops import reduce_fresh, reduce_into

_TORCH = {
    "SUM": torch.add,
    "PRODUCT": torch.mul,
    "MIN": torch.minimum,
    "MAX": torch.maximum,
    "BAND": torch.bitwise_and,
    "BOR": torch.bitwise_or,
    "BXOR": torch.bitwise_xor,
}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _parts(dt: torch.dtype, n: int, k: int, name: str, gen: torch.Generator) -> list[torch.Tensor]:
    if dt.is_floating_point:
        scale = 100.0 if name == "SUM" else 1.5
        out = [
            (torch.randn(n, dtype=torch.float64, generator=gen) * scale).to(dt) for _ in range(k)
        ]
        if n >= 4:  # specials: inf, signed zero, tiny (f16/bf16 subnormals), NaN
            out[0][:4] = torch.tensor([float("inf"), -0.0, 1e-8, float("nan")]).to(dt)
        return out
    info = torch.iinfo(dt)
    return [
        torch.randint(info.min, info.max, (n,), dtype=torch.int64, generator=gen).to(dt)
        for _ in range(k)
    ]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = _BITS[a.element_size()]
    a, b = a.view(bits), b.view(bits)
    return bool(torch.equal(a, b))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("dt", "name"), sorted(native.CODES, key=str))
def test_native_fold_matches_torch_bitwise(dt, name):
    gen = torch.Generator().manual_seed(13)
    fn = _TORCH[name]
    for n in (1, 5, 2048, 2049, 70001, 600000):
        for k in (2, 3, 5):
            parts = _parts(dt, n, k, name, gen)
            ref = fn(parts[0], parts[1])
            for p in parts[2:]:
                ref = fn(ref, p)
            out = torch.empty_like(ref)
            assert native.reduce(out, parts, name)
            if dt.is_floating_point:  # NaN payloads differ between torch's own code paths
                nan = torch.isnan(ref)
                assert torch.equal(nan, torch.isnan(out)), (dt, name, n, k)
                ref, out = ref.masked_fill(nan, 0), out.masked_fill(nan, 0)
            assert _same_bits(out, ref), (dt, name, n, k)
            # in place over the first part (reduce_into's aliasing case), several threads
            acc = parts[0].clone()
            assert native.reduce(acc, [acc, *parts[1:]], name)
            if dt.is_floating_point:
                acc = acc.masked_fill(torch.isnan(acc), 0)
            assert _same_bits(acc, ref)
            # into the last part (the engine's fold lands the result over this rank's input,
            # which may sit anywhere in member order)
            last = parts[-1].clone()
            assert native.reduce(last, [*parts[:-1], last], name)
            if dt.is_floating_point:
                last = last.masked_fill(torch.isnan(last), 0)
            assert _same_bits(last, ref)


@pytest.mark.timeout(60)
def test_hot_paths_call_no_torch_kernels(monkeypatch):
    """reduce_into / reduce_fresh / native.copy for covered dtypes never reach torch's kernels
    (which would run on the caller's intra-op thread pool)."""
    gen = torch.Generator().manual_seed(1)
    cases = [(dt, name, _parts(dt, 300000, 3, name, gen)) for dt, name in native.CODES]
    expected = []
    for _, name, parts in cases:
        ref = _TORCH[name](parts[0], parts[1])
        expected.append(_TORCH[name](ref, parts[2]))

    def boom(*a, **k):
        raise AssertionError("a torch kernel was called on the backend's hot path")

    for attr in ("add", "mul", "minimum", "maximum", "bitwise_and", "bitwise_or", "bitwise_xor"):
        monkeypatch.setattr(torch, attr, boom)
    for attr in ("copy_", "add_", "mul_", "zero_", "bitwise_and_", "bitwise_or_", "bitwise_xor_"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    for (dt, name, parts), ref in zip(cases, expected):
        out = torch.empty(parts[0].numel(), dtype=dt)
        reduce_fresh(out, parts, name)
        acc = torch.empty(parts[0].numel(), dtype=dt)
        native.copy(acc, parts[0])
        reduce_into(acc, [acc, *parts[1:]], name)
        native.copy(parts[1], acc)
        native.zero(acc)
        assert not acc.view(_BITS[dt.itemsize]).any()
        monkeypatch.undo()
        try:
            for got in (out, parts[1]):
                if dt.is_floating_point:
                    got = got.masked_fill(torch.isnan(got), 0)
                    want = ref.masked_fill(torch.isnan(ref), 0)
                else:
                    want = ref
                assert _same_bits(got, want), (dt, name)
        finally:
            for attr in ("add", "mul", "minimum", "maximum", "bitwise_and", "bitwise_or",
                         "bitwise_xor"):  # fmt: skip
                monkeypatch.setattr(torch, attr, boom)
            for attr in ("copy_", "add_", "mul_", "zero_", "bitwise_and_", "bitwise_or_",
                         "bitwise_xor_"):  # fmt: skip
                monkeypatch.setattr(torch.Tensor, attr, boom)


@pytest.mark.timeout(30)
def test_native_threads_never_touch_torch_settings():
    before = torch.get_num_threads()
    a = torch.ones(4 << 20)
    assert native.reduce(a, [a, torch.ones(4 << 20)], "SUM")
    assert torch.get_num_threads() == before
    assert float(a[0]) == 2.0
    assert float(a[-1]) == 2.0
    assert native.threads(1024, 2) == 1
    assert native.threads(64 << 20, 1) >= 1


@pytest.mark.timeout(30)
def test_engine_reduce_rejects_bad_input():
    from mooncake.transfer import reduce_buffers

    a = torch.ones(4)
    with pytest.raises(ValueError, match="dtype 1 / op 3"):
        reduce_buffers(1, 3, 4, [a.data_ptr()], a.data_ptr())  # float MIN: torch's job
    with pytest.raises(ValueError, match="unknown dtype"):
        reduce_buffers(42, 1, 4, [a.data_ptr()], a.data_ptr())
    with pytest.raises(ValueError, match="threads"):
        reduce_buffers(1, 1, 4, [a.data_ptr()], a.data_ptr(), 0)
    with pytest.raises(ValueError, match="parts"):
        reduce_buffers(1, 1, 4, [0], a.data_ptr())
