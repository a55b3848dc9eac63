"""NVFP4: E2M1 elements, one E4M3 scale per 16 elements along K, one FP32 tensor scale.

Conventions are compressed-tensors' (``nvfp4-pack-quantized``), byte for byte:

* ``global_scale = 448 * 6 / amax(w)`` is a *divisor* at dequantization (ModelOpt stores its inverse,
  ``weight_scale_2``, as a multiplier);
* ``block_scale = e4m3(clamp(global_scale * block_amax / 6, +-448))``, a zero scale replaced by 0.125
  (e4m3's eps), as compressed-tensors does;
* ``element = e2m1(clamp(w / (block_scale / global_scale), +-6))``, dequantized as
  ``element * (block_scale / global_scale)``.

All scale arithmetic runs in float32 whatever the input dtype (as ModelOpt and vLLM's reference).
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

BLOCK_SIZE = 16
FP8_MAX = 448.0
FP8_EPS = 0.125  # torch.finfo(torch.float8_e4m3fn).eps, what compressed-tensors puts in place of a 0 scale


def _check_blocks(x: torch.Tensor, block_size: int, what: str) -> None:
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"{what} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.shape[-1] % block_size:
        raise ValueError(
            f"{what}: last dimension K={x.shape[-1]} is not divisible by the block size {block_size}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """compressed-tensors' tensor scale ``448*6/amax`` (float32; shape [1] for a scalar ``amax``, else the
    shape of ``amax``: one scale per stacked tensor); 1.0 where it is not finite."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    amax = amax.reshape(1) if amax.dim() == 0 else amax
    g = (FP8_MAX * E2M1_MAX) / amax.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def nvfp4_block_scales(blocks: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales for float32 ``blocks`` [..., nblocks, block] given the tensor scale."""
    amax = blocks.abs().amax(dim=-1)
    scale = ((amax / E2M1_MAX) * global_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return torch.where(scale == 0, FP8_EPS, scale).to(torch.float8_e4m3fn)


def _quantize_blocks(x: torch.Tensor, global_scale: torch.Tensor, block_size: int):
    """Return (E2M1 values [..., nb, block] float32, e4m3 scales [..., nb], scale/global float32)."""
    blocks = x.float().unflatten(-1, (-1, block_size))
    block_scale = nvfp4_block_scales(blocks, global_scale)
    step = block_scale.float() / global_scale
    q = round_e2m1((blocks / step.unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX))
    return q, block_scale, step


@dataclass
class NVFP4Tensor:
    """A weight [N, K] in compressed-tensors NVFP4 layout."""

    packed: torch.Tensor  # uint8 [N, K/2]
    block_scale: torch.Tensor  # float8_e4m3fn [N, K/16]
    global_scale: torch.Tensor  # float32 [1], a divisor

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.uint8 or self.packed.ndim != 2:
            raise ValueError(
                f"packed must be uint8 [N, K/2], got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        n, k = self.shape
        if self.block_scale.dtype != torch.float8_e4m3fn:
            raise ValueError(f"block_scale must be float8_e4m3fn, got {self.block_scale.dtype}")
        if k % BLOCK_SIZE or tuple(self.block_scale.shape) != (n, k // BLOCK_SIZE):
            raise ValueError(
                f"block_scale shape {tuple(self.block_scale.shape)} does not match a weight of shape "
                f"[{n}, {k}] with blocks of {BLOCK_SIZE} (expected [{n}, {k // BLOCK_SIZE}])"
            )
        self.global_scale = self.global_scale.to(torch.float32).reshape(1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.block_scale.numel() + 4

    def to(self, device: torch.device | str) -> "NVFP4Tensor":
        return NVFP4Tensor(self.packed.to(device), self.block_scale.to(device), self.global_scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Exact float32 ``e2m1 * block_scale / global_scale``, then cast to ``dtype``."""
        values = codes_to_e2m1(unpack_nibbles(self.packed)).unflatten(-1, (-1, BLOCK_SIZE))
        step = self.block_scale.float() / self.global_scale
        return (values * step.unsqueeze(-1)).flatten(-2).to(dtype)

    @classmethod
    def cat(cls, parts: "list[NVFP4Tensor]") -> "NVFP4Tensor":
        """Concatenate weights along N (fused q/k/v or gate/up); their tensor scales must be equal."""
        g = parts[0].global_scale
        if any(not torch.equal(p.global_scale, g) for p in parts[1:]):
            raise ValueError(
                "cannot fuse NVFP4 weights with different global scales; quantize them with a shared one"
            )
        return cls(torch.cat([p.packed for p in parts]), torch.cat([p.block_scale for p in parts]), g)

    @classmethod
    def from_modelopt(
        cls, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor
    ) -> "NVFP4Tensor":
        """Build from a ModelOpt checkpoint's tensors (``weight_scale_2`` is a multiplier)."""
        return cls(weight, weight_scale, 1.0 / weight_scale_2.float().reshape(1))


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} contains {bad} non-finite values (NaN or Inf); cannot quantize")


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    """Quantize a weight [N, K] to NVFP4 (compressed-tensors recipe and bytes).

    ``global_scale`` overrides the tensor scale, e.g. one shared by fused q/k/v or gate/up projections.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_nvfp4 expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    _check_blocks(w, BLOCK_SIZE, "weight")
    _check_finite(w, "weight")
    g = (
        nvfp4_global_scale(w.abs().amax().float())
        if global_scale is None
        else global_scale.float().reshape(1)
    )
    g = g.to(w.device)
    q, block_scale, _ = _quantize_blocks(w, g, BLOCK_SIZE)
    return NVFP4Tensor(pack_nibbles(e2m1_to_codes(q.flatten(-2))), block_scale, g)


def qdq_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize along the last dim in NVFP4 (no gradient logic); NaN propagates.

    ``global_scale`` is a static tensor scale (an activation's calibrated ``input_global_scale``); without
    it the tensor scale is dynamic, from this tensor's amax.
    """
    _check_blocks(x, BLOCK_SIZE, "input")
    if global_scale is None:
        global_scale = nvfp4_global_scale(x.detach().abs().amax().float())
    g = global_scale.to(device=x.device, dtype=torch.float32).reshape(1)
    q, _, step = _quantize_blocks(x, g, BLOCK_SIZE)
    return (q * step.unsqueeze(-1)).flatten(-2).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, *args):
        ctx.num_args = len(args)
        return fn(x, *args)

    @staticmethod
    def backward(ctx, grad):
        return (grad, None) + (None,) * ctx.num_args


def straight_through(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """Apply ``fn(x, *args)`` forward with an identity (straight-through) gradient for ``x``."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x, *args)
    return _StraightThrough.apply(x, fn, *args)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize along the last dim with a straight-through gradient."""
    return straight_through(qdq_nvfp4, x, global_scale)
