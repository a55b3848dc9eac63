"""The ReQAT 4-bit KV-cache format: E1M2 elements (grid 0, 0.5, ..., 3.5), one E4M3 scale per 16
channels along head_dim, and a dynamic per-tensor FP32 scale (ModelOpt's convention, a multiplier):

    g = amax / (3.5 * 448),  s = e4m3(block_amax / (3.5 * g)),  x_hat = e1m2(x / (s * g)) * s * g
"""

import torch

from fp4reason.formats.elements import E1M2_MAX, round_e1m2
from fp4reason.formats.nvfp4 import BLOCK_SIZE, FP8_MAX, _check_blocks, straight_through


def qdq_kv4(x: torch.Tensor) -> torch.Tensor:
    """KV4 quantize-dequantize along the last dim (head_dim) with a dynamic tensor scale."""
    _check_blocks(x, BLOCK_SIZE, "key/value")
    blocks = x.float().unflatten(-1, (-1, BLOCK_SIZE))
    g = blocks.abs().amax() / (E1M2_MAX * FP8_MAX)
    g_safe = torch.where(g > 0, g, 1.0)  # an all-zero tensor: zero scales and values, not 0/0 = NaN
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    s = (block_amax / (E1M2_MAX * g_safe)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float() * g
    safe = torch.where(s > 0, s, 1.0)
    q = torch.where(s > 0, round_e1m2((blocks / safe).clamp(-E1M2_MAX, E1M2_MAX)), blocks * 0.0)
    return (q * s).flatten(-2).to(x.dtype)


def fake_quantize_kv4(x: torch.Tensor) -> torch.Tensor:
    """KV4 quantize-dequantize with a straight-through gradient."""
    return straight_through(qdq_kv4, x)
