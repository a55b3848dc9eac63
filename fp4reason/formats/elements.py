"""4-bit element grids (E2M1 for NVFP4/MXFP4, E1M2 for the ReQAT KV cache) and nibble packing.

Rounding is round-to-nearest, ties to even, saturating: the thresholds compressed-tensors, vLLM and
ModelOpt use. Sign follows ``torch.sign`` like compressed-tensors' CPU path: a value that rounds to
zero keeps its sign (code 8 = -0), an exact +-0 input gives +0. NaN propagates.
"""

import torch

E2M1_MAX = 6.0
E1M2_MAX = 3.5
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest E2M1 value (ties to even), saturating at +-6."""
    a = x.abs().clamp(max=E2M1_MAX)
    # grid spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.sign(x) * (torch.round(a / step) * step)


def round_e1m2(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the E1M2 grid {0, 0.5, ..., 3.5} (ties to even), saturating at +-3.5."""
    a = x.abs().clamp(max=E1M2_MAX)
    return torch.sign(x) * (torch.round(a * 2.0) * 0.5)


def e2m1_to_codes(q: torch.Tensor) -> torch.Tensor:
    """Map values already on the E2M1 grid to 4-bit codes (uint8), sign in bit 3."""
    a = q.abs()
    mag = torch.where(a < 2.0, a * 2.0, torch.where(a < 4.0, a + 2.0, a * 0.5 + 4.0))
    return mag.to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)


def codes_to_e2m1(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode 4-bit E2M1 codes to values, arithmetically on the codes' device (no host table, so it can
    run inside CUDA-graph capture): magnitudes 0-3 are m/2, 4-7 are (2 + m%2) * 2^(m//2 - 2)."""
    mag = (codes & 7).to(torch.int32)
    high = ((mag & 1) + 2).to(dtype) * torch.exp2(((mag >> 1) - 2).to(dtype))
    value = torch.where(mag < 4, mag.to(dtype) * 0.5, high)
    return torch.where((codes & 8) != 0, -value, value)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., K] into uint8 [..., K/2]: element 2i in the low nibble, 2i+1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes along the last dim ({codes.shape[-1]})")
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 [..., K/2] into codes [..., K] (inverse of :func:`pack_nibbles`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP4 data must be uint8, got {packed.dtype}")
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
