"""FP4 linear kernels. ``nvfp4_linear`` runs the small-M Hopper CUDA kernel for CUDA inputs (see
``fp4reason.kernels.cuda``) and the reference path (dequantize + matmul) everywhere else, so callers
work on any machine."""

import torch

from fp4reason.formats import NVFP4Tensor, qdq_nvfp4
from fp4reason.kernels.cuda import TiledNVFP4, nvfp4_linear_cuda, prepare_nvfp4, tile_nvfp4, untile_nvfp4
from fp4reason.kernels.reference import _check_input, mxfp4_linear_reference, nvfp4_linear_reference

mxfp4_linear = mxfp4_linear_reference


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
    _check_input(x, w.shape[1])
    if w.device != x.device:
        raise ValueError(f"input is on {x.device} but the NVFP4 weight is on {w.device}")
    if act_quant:
        x = qdq_nvfp4(x, input_global_scale)
    return nvfp4_linear_cuda(x, w, bias)


__all__ = [
    "TiledNVFP4",
    "mxfp4_linear",
    "mxfp4_linear_reference",
    "nvfp4_linear",
    "nvfp4_linear_cuda",
    "nvfp4_linear_reference",
    "prepare_nvfp4",
    "tile_nvfp4",
    "untile_nvfp4",
]
