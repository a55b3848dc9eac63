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


__all__ = [
    "TiledNVFP4",
    "dense_linear",
    "gated_rows",
    "mxfp4_linear",
    "mxfp4_linear_reference",
    "nvfp4_linear",
    "nvfp4_linear_cuda",
    "nvfp4_linear_reference",
    "nvfp4_silu_mul",
    "prepare_nvfp4",
    "silu_mul_reference",
    "tile_dense",
    "tile_nvfp4",
    "untile_dense",
    "untile_nvfp4",
]
