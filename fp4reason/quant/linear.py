"""FP4Linear: a Linear whose weight lives in FP4, stored exactly like a compressed-tensors checkpoint.

Buffers (names, dtypes and shapes of the checkpoint tensors):
  nvfp4: ``weight_packed`` uint8 [N, K/2], ``weight_scale`` float8_e4m3fn [N, K/16], ``weight_global_scale``
         float32 [1], and for A4 ``input_global_scale`` float32 [1] (static activation tensor scale);
  mxfp4: ``weight_packed`` uint8 [N, K/2], ``weight_scale`` uint8 E8M0 [N, K/32].
``model.to(dtype)`` never touches them (only ``bias`` follows the model dtype).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp4reason import kernels
from fp4reason.formats import (
    MXFP4Tensor,
    NVFP4Tensor,
    fake_quantize_mxfp4,
    fake_quantize_nvfp4,
    quantize_mxfp4,
    quantize_nvfp4,
)
from fp4reason.quant.scheme import Scheme, get_scheme

QUANT_BUFFERS = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


class FP4Linear(nn.Module):
    """``y = x @ W.T + b`` with W in NVFP4/MXFP4; A4 schemes quantize the input to FP4 first.

    On CPU the forward caches the dequantized weight (not saved, identical results); on CUDA it calls
    ``fp4reason.kernels.nvfp4_linear`` (with the kernel's prepared weight, cached) / ``mxfp4_linear``.
    Caches are dropped on device/dtype moves and ``load_state_dict``; after in-place buffer edits call
    ``reset_cache()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: "str | Scheme",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.scheme = get_scheme(scheme)
        bs = self.scheme.block_size
        if in_features % bs:
            raise ValueError(
                f"in_features={in_features} is not divisible by the {self.scheme.weight_format} "
                f"block size {bs}"
            )
        self.in_features, self.out_features = in_features, out_features
        n, k = out_features, in_features
        self.register_buffer("weight_packed", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        if self.scheme.weight_format == "nvfp4":
            self.register_buffer(
                "weight_scale", torch.zeros(n, k // bs, dtype=torch.float8_e4m3fn, device=device)
            )
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
            if self.scheme.act_quant:
                self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.register_buffer(
                "weight_scale", torch.full((n, k // bs), 127, dtype=torch.uint8, device=device)
            )
        self.bias = (
            nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self._dequant: torch.Tensor | None = None  # CPU: dequantized weight (not saved)
        self._prepared = None  # CUDA: the kernel's prepared (tiled) weight (not saved)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: "str | Scheme",
        *,
        weight_global_scale: torch.Tensor | None = None,
        input_global_scale: torch.Tensor | None = None,
    ) -> "FP4Linear":
        """Quantize ``linear.weight`` (RTN, compressed-tensors recipe). ``weight_global_scale`` overrides the
        tensor scale (shared by fused q/k/v, gate/up); ``input_global_scale`` is required for NVFP4 A4."""
        scheme = get_scheme(scheme)
        w = linear.weight.detach()
        mod = cls(
            linear.in_features,
            linear.out_features,
            scheme,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        if scheme.weight_format == "nvfp4":
            q = quantize_nvfp4(w, weight_global_scale)
            mod.weight_packed.copy_(q.packed)
            mod.weight_scale.copy_(q.block_scale)
            mod.weight_global_scale.copy_(q.global_scale)
            if scheme.act_quant:
                if input_global_scale is None:
                    raise ValueError(f"scheme {scheme.name} needs a calibrated input_global_scale")
                igs = torch.as_tensor(input_global_scale, dtype=torch.float32).reshape(1)
                if not torch.isfinite(igs).all() or (igs <= 0).any():
                    raise ValueError(f"input_global_scale must be finite and > 0, got {igs.item()}")
                mod.input_global_scale.copy_(igs)
        else:
            q = quantize_mxfp4(w)
            mod.weight_packed.copy_(q.packed)
            mod.weight_scale.copy_(q.scale)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    @property
    def weight_fp4(self) -> NVFP4Tensor | MXFP4Tensor:
        if self.scheme.weight_format == "nvfp4":
            return NVFP4Tensor(self.weight_packed, self.weight_scale, self.weight_global_scale)
        return MXFP4Tensor(self.weight_packed, self.weight_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_fp4.dequantize(dtype)

    def reset_cache(self) -> None:
        """Drop the cached dequantized / kernel-prepared weight (after editing the buffers in place)."""
        self._dequant = self._prepared = None

    def _apply(self, fn, recurse=True):
        # keep the FP4 buffers' dtypes under model.to(dtype)/.half(); follow device moves only
        saved = {n: self._buffers.pop(n) for n in QUANT_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, buf in saved.items():
            self._buffers[name] = buf.to(fn(buf[:0].float()).device)
        self._dequant = self._prepared = None
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequant = self._prepared = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nv = self.scheme.weight_format == "nvfp4"
        igs = self.input_global_scale if nv and self.scheme.act_quant else None
        if x.is_cuda:
            if nv:
                if self._prepared is None or self._prepared.device != x.device:
                    prepare = getattr(kernels, "prepare_nvfp4", lambda w: w)  # the kernel's tiled copy
                    self._prepared = prepare(self.weight_fp4)
                return kernels.nvfp4_linear(
                    x, self._prepared, self.bias, act_quant=self.scheme.act_quant, input_global_scale=igs
                )
            return kernels.mxfp4_linear(x, self.weight_fp4, self.bias, act_quant=self.scheme.act_quant)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features but the FP4 weight expects K={self.in_features}"
            )
        if self._dequant is None or self._dequant.dtype != x.dtype or self._dequant.device != x.device:
            self._dequant = self.weight_fp4.dequantize(x.dtype)
        if self.scheme.act_quant:
            x = fake_quantize_nvfp4(x, igs) if nv else fake_quantize_mxfp4(x)
        return F.linear(x, self._dequant, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
            f"bias={self.bias is not None}"
        )
