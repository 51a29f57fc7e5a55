"""The contract's per-token FP8 cast, its scale formats and the inverse.

Every path (portable and kernels) must produce these exact bytes. The rules (docs/contracts/ep.md,
"FP8"):

- Per token and per group of ``GROUP_SIZE`` (128) channels: ``amax = max(|x|)`` in fp32, clamped to
  at least ``AMAX_FLOOR`` (1e-4).
- ``scale_inv = amax / FP8_MAX`` (a true fp32 division, not a multiply by ``1/448``).
- ``round_scale``: ``scale_inv`` is rounded *up* to a power of two: ``2 ** ceil(log2(scale_inv))``,
  computed on the float bits (exponent + 1 when the mantissa is non-zero), so it is exact.
- data = saturating e4m3 of ``x / scale_inv`` (fp32 division, then clamped to +-448 before the cast,
  so no value becomes NaN).
- ``use_ue8m0`` (requires ``round_scale``): the scale travels as its exponent byte ``bits >> 23``;
  the receiver packs four exponent bytes per int32, little endian: byte ``j`` (bits ``8j..8j+7``) of
  int ``i`` holds the exponent of channel group ``4i + j``. When ``H/128`` is not a multiple of 4
  the last int is padded with zero bytes (so its width is ``ceil(H/512)``)."""

from __future__ import annotations

import torch

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
GROUP_SIZE = 128
UE8M0_PER_INT = 4

__all__ = [
    "AMAX_FLOOR",
    "FP8_MAX",
    "GROUP_SIZE",
    "calc_diff",
    "num_scale_groups",
    "num_ue8m0_ints",
    "pack_ue8m0",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "round_up_pow2",
    "scale_inv_from_amax",
    "ue8m0_exponents",
    "ue8m0_to_scale",
    "unpack_ue8m0",
]


def num_scale_groups(hidden: int) -> int:
    """Scale groups per token: ``hidden / 128``."""
    return hidden // GROUP_SIZE


def num_ue8m0_ints(hidden: int) -> int:
    """int32 words per token for packed UE8M0 scales: ``ceil(hidden / 512)``."""
    return (num_scale_groups(hidden) + UE8M0_PER_INT - 1) // UE8M0_PER_INT


def round_up_pow2(scale_inv: torch.Tensor) -> torch.Tensor:
    """Round positive normal float32 values up to a power of two, exactly (bit arithmetic)."""
    bits = scale_inv.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa_nonzero = (bits & 0x7FFFFF) != 0
    rounded_exponent = exponent + mantissa_nonzero.to(torch.int32)
    return (rounded_exponent << 23).view(torch.float32)


def scale_inv_from_amax(amax: torch.Tensor, round_scale: bool) -> torch.Tensor:
    """``scale_inv`` (float32) from per-group ``amax`` (float32), per the contract."""
    # Divide by a 0-dim tensor on amax's device, not by a Python float: CUDA turns division by a
    # host scalar into a multiply by its reciprocal, which is off by one ulp for some amax.
    scale_inv = amax.clamp_min(AMAX_FLOOR) / amax.new_full((), FP8_MAX)
    if round_scale:
        scale_inv = round_up_pow2(scale_inv)
    return scale_inv


def per_token_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast ``x`` ``[N, H]`` (bf16 or fp32) to FP8 with one scale per token and 128 channels.

    Returns ``(data, scales)``: ``data`` float8_e4m3fn ``[N, H]`` contiguous; ``scales`` float32
    ``[N, H/128]`` (the ``scale_inv`` values, dequant is ``data * scale``), or with ``use_ue8m0``
    uint8 ``[N, H/128]`` exponent bytes (unpacked; ``pack_ue8m0`` gives the int32 form).
    """
    if use_ue8m0 and not round_scale:
        raise ValueError(
            "use_ue8m0=True requires round_scale=True (UE8M0 scales are powers of two)"
        )
    n, hidden = x.shape
    if hidden % GROUP_SIZE != 0:
        raise ValueError(f"hidden={hidden} must be a multiple of {GROUP_SIZE} for the FP8 cast")
    groups = x.float().view(n, hidden // GROUP_SIZE, GROUP_SIZE)
    amax = groups.abs().amax(dim=-1)
    scale_inv = scale_inv_from_amax(amax, round_scale)
    scaled = (groups / scale_inv.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    data = scaled.to(torch.float8_e4m3fn).view(n, hidden)
    if use_ue8m0:
        return data, ue8m0_exponents(scale_inv)
    return data, scale_inv


def ue8m0_exponents(scale_inv: torch.Tensor) -> torch.Tensor:
    """Exponent bytes (uint8) of power-of-two float32 scales: ``bits >> 23``."""
    return ((scale_inv.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def ue8m0_to_scale(exponents: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** (e - 127)`` from exponent bytes (uint8 or any integer dtype)."""
    return (exponents.to(torch.int32) << 23).view(torch.float32)


def pack_ue8m0(exponents: torch.Tensor) -> torch.Tensor:
    """Pack uint8 exponents ``[..., G]`` into int32 ``[..., ceil(G/4)]`` (little endian)."""
    groups = exponents.shape[-1]
    words = (groups + UE8M0_PER_INT - 1) // UE8M0_PER_INT
    padded = exponents.new_zeros((*exponents.shape[:-1], words * UE8M0_PER_INT))
    padded[..., :groups] = exponents
    b = padded.to(torch.int32).view(*exponents.shape[:-1], words, UE8M0_PER_INT)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of ``pack_ue8m0``: int32 ``[..., W]`` to uint8 ``[..., num_groups]``."""
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=packed.device)
    b = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xFF
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * UE8M0_PER_INT)[..., :num_groups].to(
        torch.uint8
    )


def per_token_cast_back(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize FP8 ``data`` ``[..., H]`` with ``scales`` to bf16 ``[..., H]``.

    ``scales`` is float32 ``[..., H/128]`` (scale_inv values) or int32 ``[..., ceil(H/512)]`` packed
    UE8M0 exponents. Either may be a non-contiguous view (e.g. the column-major dispatch output).
    """
    hidden = data.shape[-1]
    groups = hidden // GROUP_SIZE
    if scales.dtype == torch.int32:
        scale = ue8m0_to_scale(unpack_ue8m0(scales, groups))
    elif scales.dtype == torch.float32:
        scale = scales
    else:
        raise TypeError(f"scales dtype {scales.dtype} is neither float32 nor int32 (packed UE8M0)")
    values = data.float().view(*data.shape[:-1], groups, GROUP_SIZE) * scale.unsqueeze(-1)
    return values.view(data.shape).to(torch.bfloat16)


def calc_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The contract's error ``1 - 2*sum((a+1)(b+1)) / sum((a+1)^2 + (b+1)^2)``, in float64."""
    a = a.double() + 1
    b = b.double() + 1
    denominator = (a * a + b * b).sum()
    return float(1 - 2 * (a * b).sum() / denominator)
