"""The contract's FP8 cast, scale rounding, UE8M0 packing and dequantization."""

from __future__ import annotations

import pytest
import torch

from mooncake.ep.fp8 import (
    calc_diff,
    pack_ue8m0,
    per_token_cast_back,
    per_token_cast_to_fp8,
    round_up_pow2,
    scale_inv_from_amax,
    ue8m0_exponents,
    unpack_ue8m0,
)


def test_scale_is_amax_over_448_per_128_channels() -> None:
    x = torch.zeros((2, 256), dtype=torch.bfloat16)
    x[0, :128] = 3.0
    x[0, 5] = -7.0
    x[0, 128:] = 0.5
    data, scales = per_token_cast_to_fp8(x)
    assert scales.dtype == torch.float32
    assert scales.shape == (2, 2)
    assert scales[0, 0].item() == pytest.approx(7.0 / 448, rel=0)
    assert scales[0, 1].item() == torch.tensor(0.5 / 448, dtype=torch.float32).item()
    # an all-zero group uses the amax floor 1e-4
    assert scales[1, 0].item() == (torch.tensor(1e-4, dtype=torch.float32) / 448).item()
    assert data[0, 5].float().item() == -448.0
    assert data.dtype == torch.float8_e4m3fn


def test_data_is_x_divided_by_scale_inv_saturated() -> None:
    torch.manual_seed(0)
    x = (torch.randn((8, 384)) * 3).to(torch.bfloat16)
    data, scales = per_token_cast_to_fp8(x)
    want = (
        (x.float().view(8, 3, 128) / scales.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    )
    assert torch.equal(data.view(torch.uint8), want.view(8, 384).view(torch.uint8))
    assert not torch.isnan(data.float()).any()


def test_round_scale_rounds_up_to_power_of_two() -> None:
    values = torch.tensor([1.0, 1.5, 0.3, 2.0**-20, 3.999], dtype=torch.float32)
    rounded = round_up_pow2(values)
    assert rounded.tolist() == [1.0, 2.0, 0.5, 2.0**-20, 4.0]
    amax = torch.tensor([448.0, 449.0, 1e-9])
    assert scale_inv_from_amax(amax, True).tolist() == [
        1.0,
        2.0,
        round_up_pow2(torch.tensor([1e-4 / 448])).item(),
    ]


def test_ue8m0_exponent_and_packing() -> None:
    scales = torch.tensor([[1.0, 2.0, 0.5, 2.0**-10, 4.0]], dtype=torch.float32)
    exps = ue8m0_exponents(scales)
    assert exps.tolist() == [[127, 128, 126, 117, 129]]
    packed = pack_ue8m0(exps)
    assert packed.dtype == torch.int32
    assert packed.shape == (1, 2)
    assert packed[0, 0].item() == 127 | 128 << 8 | 126 << 16 | 117 << 24
    assert packed[0, 1].item() == 129  # padded with zero bytes
    assert torch.equal(unpack_ue8m0(packed, 5), exps)


@pytest.mark.parametrize(
    ("round_scale", "use_ue8m0"), [(False, False), (True, False), (True, True)]
)
def test_cast_back_within_contract_tolerance(round_scale: bool, use_ue8m0: bool) -> None:
    torch.manual_seed(1)
    x = (torch.randn((64, 640)) * 0.1).to(torch.bfloat16)
    data, scales = per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    if use_ue8m0:
        scales = pack_ue8m0(scales)
    back = per_token_cast_back(data, scales)
    assert back.dtype == torch.bfloat16
    assert calc_diff(x, back) < 9e-4


def test_structured_rows_are_exact() -> None:
    x = torch.full((4, 256), -125, dtype=torch.bfloat16)
    x[:, -128:] = torch.arange(4, dtype=torch.bfloat16).view(-1, 1)
    data, scales = per_token_cast_to_fp8(x)
    assert torch.equal(per_token_cast_back(data, scales), x)


def test_ue8m0_requires_round_scale() -> None:
    with pytest.raises(ValueError, match="requires round_scale"):
        per_token_cast_to_fp8(
            torch.zeros((1, 128), dtype=torch.bfloat16), round_scale=False, use_ue8m0=True
        )


def test_calc_diff() -> None:
    a = torch.randn(100)
    assert calc_diff(a, a) == pytest.approx(0, abs=1e-12)
    assert calc_diff(a, a + 1) > 1e-3
