"""FP4 linear kernels. ``nvfp4_linear`` runs the small-M Hopper CUDA kernel for CUDA inputs (see
``fp4reason.kernels.cuda``) and the reference path (dequantize + matmul) everywhere else, so callers
work on any machine."""

import torch

from fp4reason.formats import NVFP4Tensor, qdq_nvfp4
from fp4reason.kernels.cuda import (
    TiledNVFP4,
    dense_linear,
    gated_rows,
    nvfp4_linear_cuda,
    nvfp4_norm_linear_cuda,
    prepare_nvfp4,
    tile_dense,
    tile_nvfp4,
    untile_dense,
    untile_nvfp4,
)
from fp4reason.kernels.reference import (
    _check_input,
    mxfp4_linear_reference,
    nvfp4_linear_reference,
    rms_norm_reference,
    silu_mul_reference,
)

mxfp4_linear = mxfp4_linear_reference


def _cuda_input(x: torch.Tensor, w, act_quant: bool, input_global_scale) -> torch.Tensor:
    """A CUDA call's checked input, NVFP4-quantized first for W4A4 (``act_quant``)."""
    _check_input(x, w.shape[1])
    if w.device != x.device:
        raise ValueError(f"input is on {x.device} but the NVFP4 weight is on {w.device}")
    return qdq_nvfp4(x, input_global_scale) if act_quant else x


def nvfp4_linear(
    x: torch.Tensor,
    w: NVFP4Tensor | TiledNVFP4,
    bias: torch.Tensor | None = None,
    *,
    act_quant: bool = False,
    input_global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(w).T + bias`` (W4A16). With ``act_quant`` the input is first NVFP4-quantized
    per 16-block (W4A4 numerics) with ``input_global_scale`` (compressed-tensors' divisor) or, if None,
    a dynamic tensor scale. CUDA inputs use the GPU kernel (``w`` ideally from :func:`prepare_nvfp4`),
    others the reference."""
    if not x.is_cuda:
        if isinstance(w, TiledNVFP4):
            w = w.to_nvfp4()
        return nvfp4_linear_reference(x, w, bias, act_quant=act_quant, input_global_scale=input_global_scale)
    return nvfp4_linear_cuda(_cuda_input(x, w, act_quant, input_global_scale), w, bias)


def nvfp4_silu_mul(
    x: torch.Tensor,
    w: NVFP4Tensor | TiledNVFP4,
    bias: torch.Tensor | None = None,
    *,
    act_quant: bool = False,
    input_global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A SwiGLU MLP's first half, ``silu(gate) * up`` [..., I], from a fused [gate; up] NVFP4 weight [2I, K]
    (gate rows first, as ``NVFP4Tensor.cat([gate, up])`` makes it). On CUDA one kernel launch: the
    activation is applied in the kernel's epilogue (``w`` ideally from ``prepare_nvfp4(w, gated=True)``;
    I % 8 == 0); elsewhere the reference linear, then ``silu_mul_reference``."""
    n = w.shape[0]
    if n % 2:
        raise ValueError(f"a fused gate/up weight has an even number of rows, got N={n}")
    if not x.is_cuda:
        return silu_mul_reference(
            nvfp4_linear(x, w, bias, act_quant=act_quant, input_global_scale=input_global_scale)
        )
    x = _cuda_input(x, w, act_quant, input_global_scale)
    if n % 16:  # the kernel's gated tiles hold 8 gate and 8 up rows
        return silu_mul_reference(nvfp4_linear_cuda(x, w, bias))
    return nvfp4_linear_cuda(x, w, bias, gated=True)


def nvfp4_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    w: NVFP4Tensor | TiledNVFP4,
    bias: torch.Tensor | None = None,
    *,
    delta: torch.Tensor | None = None,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm projection with its residual add: ``h = x + delta`` (``delta`` None: ``h = x``), then
    ``(proj(rms_norm(h) * norm_weight), h)`` with HF's RMSNorm and ``proj`` = :func:`nvfp4_linear` (``gated``:
    :func:`nvfp4_silu_mul`). W4A16. On CUDA the add and the norm run inside the projection's kernel where
    the rows fit its shared memory; elsewhere the reference ops."""
    k = w.shape[1]
    _check_input(x, k)
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device):
        raise ValueError(
            f"delta must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got {tuple(delta.shape)}, {delta.dtype}, {delta.device}"
        )
    if norm_weight.shape != (k,) or norm_weight.device != x.device:
        raise ValueError(
            f"norm_weight must have shape ({k},) on {x.device}, "
            f"got {tuple(norm_weight.shape)} on {norm_weight.device}"
        )
    proj = nvfp4_silu_mul if gated else nvfp4_linear
    if not x.is_cuda or (gated and w.shape[0] % 16):
        h = x + delta if delta is not None else x
        return proj(rms_norm_reference(h, norm_weight.to(x.dtype), eps), w, bias), h
    _cuda_input(x, w, False, None)
    return nvfp4_norm_linear_cuda(x, delta, norm_weight, eps, w, bias, gated=gated)


__all__ = [
    "TiledNVFP4",
    "dense_linear",
    "gated_rows",
    "mxfp4_linear",
    "mxfp4_linear_reference",
    "nvfp4_linear",
    "nvfp4_linear_cuda",
    "nvfp4_linear_reference",
    "nvfp4_norm_linear",
    "nvfp4_silu_mul",
    "prepare_nvfp4",
    "rms_norm_reference",
    "silu_mul_reference",
    "tile_dense",
    "tile_nvfp4",
    "untile_dense",
    "untile_nvfp4",
]
