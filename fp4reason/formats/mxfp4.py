"""MXFP4 (OCP Microscaling): E2M1 elements, one E8M0 power-of-two scale per 32 elements along K.

Scales follow compressed-tensors ``mxfp4-pack-quantized``: the block amax is first rounded to a power
of two (up when its mantissa is >= 1.75, else down), then ``exponent = floor(log2) - 2`` (E2M1's emax),
stored biased by 127 in a uint8. A reader takes the stored byte at face value; 255 decodes to NaN.
"""

from dataclasses import dataclass

import torch

from fp4reason.formats.elements import (
    E2M1_MAX,
    codes_to_e2m1,
    e2m1_to_codes,
    pack_nibbles,
    round_e2m1,
    unpack_nibbles,
)
from fp4reason.formats.nvfp4 import _check_blocks, _check_finite, straight_through

MX_BLOCK_SIZE = 32
_E2M1_EMAX = 2


def mx_block_exponents(blocks: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponents (uint8) for float32 ``blocks`` [..., nblocks, 32]."""
    amax = blocks.abs().amax(dim=-1).float()
    # round to a power of two on the float32 bits: add half of E2M1's last mantissa step, drop the mantissa
    bits = amax.view(torch.int32)
    pow2 = ((bits + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)
    exp = 127 + torch.floor(torch.log2(pow2)) - _E2M1_EMAX
    return exp.nan_to_num(nan=255.0).clamp(0, 254).to(torch.uint8)


def _scale_from_exponent(exp: torch.Tensor) -> torch.Tensor:
    """E8M0 byte -> float32 scale; 0xFF is NaN by the OCP spec (checked without a host sync)."""
    return torch.where(exp == 255, float("nan"), torch.exp2(exp.float() - 127.0))


@dataclass
class MXFP4Tensor:
    """A weight [N, K] in compressed-tensors MXFP4 layout."""

    packed: torch.Tensor  # uint8 [N, K/2]
    scale: torch.Tensor  # uint8 E8M0 [N, K/32]

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.uint8 or self.packed.ndim != 2:
            raise ValueError(
                f"packed must be uint8 [N, K/2], got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        n, k = self.shape
        if (
            self.scale.dtype != torch.uint8
            or k % MX_BLOCK_SIZE
            or tuple(self.scale.shape) != (n, k // MX_BLOCK_SIZE)
        ):
            raise ValueError(
                f"MXFP4 scale must be uint8 [{n}, {k // MX_BLOCK_SIZE}] for a weight [{n}, {k}], "
                f"got {self.scale.dtype} {tuple(self.scale.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel()

    def to(self, device: torch.device | str) -> "MXFP4Tensor":
        return MXFP4Tensor(self.packed.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        values = codes_to_e2m1(unpack_nibbles(self.packed)).unflatten(-1, (-1, MX_BLOCK_SIZE))
        return (values * _scale_from_exponent(self.scale).unsqueeze(-1)).flatten(-2).to(dtype)


def _quantize_mx_blocks(x: torch.Tensor):
    blocks = x.float().unflatten(-1, (-1, MX_BLOCK_SIZE))
    exp = mx_block_exponents(blocks)
    scale = _scale_from_exponent(exp).unsqueeze(-1)
    return round_e2m1((blocks / scale).clamp(-E2M1_MAX, E2M1_MAX)), exp, scale


def quantize_mxfp4(w: torch.Tensor) -> MXFP4Tensor:
    """Quantize a weight [N, K] to MXFP4 (compressed-tensors recipe and bytes)."""
    if w.ndim != 2:
        raise ValueError(f"quantize_mxfp4 expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    _check_blocks(w, MX_BLOCK_SIZE, "weight")
    _check_finite(w, "weight")
    q, exp, _ = _quantize_mx_blocks(w)
    return MXFP4Tensor(pack_nibbles(e2m1_to_codes(q.flatten(-2))), exp)


def qdq_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 quantize-dequantize along the last dim (dynamic per-block scales)."""
    _check_blocks(x, MX_BLOCK_SIZE, "input")
    q, _, scale = _quantize_mx_blocks(x)
    return (q * scale).flatten(-2).to(x.dtype)


def fake_quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 quantize-dequantize with a straight-through gradient."""
    return straight_through(qdq_mxfp4, x)
