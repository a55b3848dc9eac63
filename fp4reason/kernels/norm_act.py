"""Decode-step activation kernels in Triton: (residual add +) RMSNorm and SiLU-and-multiply, each optionally
followed by the next projection's NVFP4 input quantization (W4A4), in one launch per call.

Under torch.compile, inductor split ``norm -> qdq_nvfp4`` into several kernels (4 more per layer than
W4A16), and its division is not exact on CUDA. Numerics follow the eager torch code of
``fp4reason.engine.model`` (HF's RMSNorm: float32 statistics, the normalized row rounded to the input
dtype, then times the weight in that dtype; SiLU rounded, then times ``up``), and the quantization is
``fakequant.qdq_nvfp4_blocks``: bit-exact to ``formats.qdq_nvfp4`` of the rounded activation. The float32
statistics (the sum of squares, ``exp``) may differ from torch's in the last bit.

On Hopper the kernels use programmatic dependent launch (``cuda.pdl_enabled``). CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

import torch
import triton
import triton.language as tl

from fp4reason.kernels.cuda import pdl_enabled
from fp4reason.kernels.fakequant import (
    bits_view,
    check_device,
    load_f32,
    qdq_nvfp4_blocks,
    round_bf16,
    store_as,
)

SILU_TILE = 2048  # elements of one row per silu program
NORM_TILE = (
    512  # elements of one row each norm program normalizes (it reads the whole row for the statistics)
)


@triton.jit
def _round(x, BF16: tl.constexpr):
    if BF16:
        return round_bf16(x)
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def _rms_norm_act(
    X, DELTA, W, XO, Y, GS, eps, H,
    NB: tl.constexpr, TB: tl.constexpr, HAS_DELTA: tl.constexpr, QUANT: tl.constexpr, RECIP: tl.constexpr,
    BF16: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (row, t): the row's statistics from the whole row (every program of the row sums the same
    way, so all agree), then its own TB blocks of 16: a row is spread over several SMs, not one."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    off = tl.program_id(0).to(tl.int64) * H
    idx = tl.arange(0, NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = idx < H
    x = load_f32(X + off, idx, mask, BF16)
    if HAS_DELTA:
        x = _round(x + load_f32(DELTA + off, idx, mask, BF16), BF16)
    rinv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(x * x), H.to(tl.float32)) + eps))
    idx = tl.program_id(1) * TB * 16 + tl.arange(0, TB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = idx < H
    x = load_f32(X + off, idx, mask, BF16)
    if HAS_DELTA:
        x = _round(x + load_f32(DELTA + off, idx, mask, BF16), BF16)
        store_as(XO + off, idx, x, mask, BF16)
    h = _round(load_f32(W, idx, mask, BF16) * _round(x * rinv, BF16), BF16)
    if QUANT:
        h = _round(qdq_nvfp4_blocks(h, tl.load(GS), RECIP), BF16)
    store_as(Y + off, idx, h, mask, BF16)


@triton.jit
def _silu_mul_act(
    GU, Y, GS, INTER,
    TB: tl.constexpr, QUANT: tl.constexpr, RECIP: tl.constexpr, BF16: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * TB * 16 + tl.arange(0, TB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = idx < INTER
    g = load_f32(GU + row * 2 * INTER, idx, mask, BF16)
    u = load_f32(GU + row * 2 * INTER + INTER, idx, mask, BF16)
    a = _round(_round(tl.math.div_rn(g, 1.0 + tl.exp(-g)), BF16) * u, BF16)
    if QUANT:
        a = _round(qdq_nvfp4_blocks(a, tl.load(GS), RECIP), BF16)
    store_as(Y + row * INTER, idx, a, mask, BF16)


def _check(x: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{what}: bfloat16/float16 activations expected, got {x.dtype}")
    if x.shape[-1] % 16:
        raise ValueError(f"{what}: the last dim ({x.shape[-1]}) must be a multiple of 16")
    check_device(x)


def _scale(global_scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if global_scale is None else global_scale.to(device=x.device, dtype=torch.float32).reshape(1)


def rms_norm_act(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, rms_norm(x + delta) * weight)`` (``delta`` None: no add), the second quantize-dequantized
    to NVFP4 with the static ``global_scale`` if given. Rows are the leading dims of ``x`` [..., H]."""
    _check(x, "rms_norm_act")
    h = x.shape[-1]
    if weight.shape != (h,) or weight.dtype != x.dtype or (delta is not None and delta.shape != x.shape):
        raise ValueError(
            f"rms_norm_act: weight [{h}] of {x.dtype} and delta like x {tuple(x.shape)} expected"
        )
    x = x.contiguous()
    xo = torch.empty_like(x) if delta is not None else x
    y = torch.empty_like(x)
    d = delta.contiguous() if delta is not None else x
    rows = x.numel() // h if h else 0
    if rows:
        nb = triton.next_power_of_2(h // 16)
        tb = min(nb, NORM_TILE // 16)
        _rms_norm_act[(rows, triton.cdiv(h // 16, tb))](
            bits_view(x), bits_view(d), bits_view(weight.contiguous()), bits_view(xo), bits_view(y),
            _scale(global_scale, x), float(eps), h,
            NB=nb, TB=tb, HAS_DELTA=delta is not None, QUANT=global_scale is not None,
            RECIP=x.is_cuda, BF16=x.dtype == torch.bfloat16, PDL=pdl_enabled(x.device),
            num_warps=4, launch_pdl=pdl_enabled(x.device), enable_fp_fusion=False,
        )  # fmt: skip
    return xo, y


def silu_mul_act(gate_up: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [..., 2 I] = [gate | up], NVFP4 quantize-dequantized with the
    static ``global_scale`` if given."""
    _check(gate_up, "silu_mul_act")
    inter = gate_up.shape[-1] // 2
    if inter % 16:
        raise ValueError(f"silu_mul_act: the intermediate size ({inter}) must be a multiple of 16")
    gate_up = gate_up.contiguous()
    y = gate_up.new_empty(*gate_up.shape[:-1], inter)
    rows = gate_up.numel() // (2 * inter) if inter else 0
    if rows:
        tb = min(SILU_TILE, triton.next_power_of_2(inter)) // 16
        _silu_mul_act[(rows, triton.cdiv(inter, tb * 16))](
            bits_view(gate_up), bits_view(y), _scale(global_scale, gate_up), inter,
            TB=tb, QUANT=global_scale is not None, RECIP=gate_up.is_cuda,
            BF16=gate_up.dtype == torch.bfloat16, PDL=pdl_enabled(gate_up.device), num_warps=4,
            launch_pdl=pdl_enabled(gate_up.device), enable_fp_fusion=False,
        )  # fmt: skip
    return y
