"""Reference FP4 linears: exact dequantization, then a matmul in the activation dtype."""

import torch
import torch.nn.functional as F

from fp4reason.formats import MXFP4Tensor, NVFP4Tensor, qdq_mxfp4, qdq_nvfp4


def _check_input(x: torch.Tensor, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the FP4 weight expects K={k}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"input must be bf16, fp16 or fp32, got {x.dtype}")


def nvfp4_linear_reference(
    x: torch.Tensor,
    w: NVFP4Tensor,
    bias: torch.Tensor | None = None,
    *,
    act_quant: bool = False,
    input_global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(w).T + bias``; with ``act_quant`` the input is NVFP4-quantized first (W4A4)
    using ``input_global_scale`` (static, compressed-tensors' divisor) or, if None, a dynamic one."""
    _check_input(x, w.shape[1])
    if act_quant:
        x = qdq_nvfp4(x, input_global_scale)
    return F.linear(x, w.dequantize(x.dtype), bias)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, operation for operation (float32 statistics, weight applied in the input dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul_reference(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [..., gate | up] projection output, as a Hugging Face SwiGLU MLP does."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def mxfp4_linear_reference(
    x: torch.Tensor, w: MXFP4Tensor, bias: torch.Tensor | None = None, *, act_quant: bool = False
) -> torch.Tensor:
    """``y = x @ dequant(w).T + bias``; with ``act_quant`` the input is MXFP4-quantized first."""
    _check_input(x, w.shape[1])
    if act_quant:
        x = qdq_mxfp4(x)
    return F.linear(x, w.dequantize(x.dtype), bias)
