"""A small gpt-fast-style decoder that reuses a Hugging Face causal LM's weights.

The HF model (Qwen2/2.5, Qwen3, Llama; linears plain or ``fp4reason.quant.FP4Linear``) supplies every
weight; this module supplies what makes decoding fast: a static, preallocated KV cache [B, Hkv, S, D],
precomputed RoPE tables, fused q/k/v and gate/up projections, and shapes that only depend on the
batch size and a KV-length bucket, so a decode step can be captured in a CUDA graph.

Rows are left-padded: every row writes the same cache slot at each step, row ``b`` starts at slot
``start[b]`` and sees its own positions ``slot - start[b]``, exactly as HF does with an attention mask.

KV4 (scheme nvfp4-w4a4kv4): post-RoPE keys and values are quantize-dequantized with ``qdq_kv4`` as they
are written, with one dynamic tensor scale per row and write (pad slots zeroed first), so a row's result
does not depend on its batch; this equals ``fp4reason.quant.KV4Cache`` at batch 1 (which shares one scale
across a batch).

Decode attention (``attn``): "sdpa" or "math" (torch: head norms + RoPE, two cache writes, attention), or
"triton": one fused kernel from the qkv projection's output to the attention output
(``fp4reason.engine.attention``; with KV4 the torch write path stays and the kernel only attends).
Prefill always uses SDPA.
"""

import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fp4reason.formats import MXFP4Tensor, NVFP4Tensor, qdq_kv4, qdq_mxfp4, qdq_nvfp4
from fp4reason.kernels.reference import rms_norm_reference as _rms_norm

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
# NVFP4 gate/up on CUDA with the kernel's silu(gate) * up epilogue (FP4REASON_GATED_MLP=0: the plain kernel
# and a separate activation kernel, for A/B runs)
_GATED_MLP = os.environ.get("FP4REASON_GATED_MLP", "1") == "1"
_ATTN_QUANT = os.environ.get("FP4REASON_ATTN_QUANT", "1") == "1"  # A/B switch (benchmarks/NOTES.md v12)
# up to this many tokens per call, NVFP4 W4A16 qkv and gate_up on CUDA add the residual and apply their
# RMSNorm inside the projection's kernel (kernels.nvfp4_norm_linear): two add + norm kernels fewer per
# layer (0 = off until measured: benchmarks/NOTES.md v19)
_NORM_FOLD = int(os.environ.get("FP4REASON_NORM_FOLD", "0"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """Residual add, then RMSNorm: (x + delta, norm(x + delta))."""
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def _qkv_heads(qkv, q_w, k_w, cos, sin, eps: float, n_heads: int, n_kv: int):
    """Fused q/k/v output [B, T, (H + 2 Hkv) D] -> q, k [B, H(kv), T, D] (head norms, RoPE) and v."""
    b, t, _ = qkv.shape
    d = cos.shape[-1]
    q, k, v = qkv.view(b, t, n_heads + 2 * n_kv, d).split([n_heads, n_kv, n_kv], dim=2)
    if q_w is not None:
        q, k = _rms_norm(q, q_w, eps), _rms_norm(k, k_w, eps)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    return _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def _attn_math(q, k, v, mask, scale: float):
    """Decode attention as two batched matmuls and a float32 softmax (q [B, Hkv, G, D], additive mask)."""
    p = ((q @ k.transpose(-1, -2)).float() * scale + mask).softmax(-1)
    return p.to(v.dtype) @ v


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask -> additive 0 / -inf mask, built once per forward instead of once per layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _act_nvfp4(x: torch.Tensor, input_global_scale: torch.Tensor | None) -> torch.Tensor:
    """W4A4's input quantization (what ``nvfp4_linear(act_quant=True)`` does), compiled once per shape."""
    return qdq_nvfp4(x, input_global_scale)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _norm_act(x, delta, weight, eps: float, input_global_scale):
    """(Residual add +) RMSNorm, then the next projection's W4A4 input quantization: one compiled kernel."""
    if delta is None:
        h = _rms_norm(x, weight, eps)
    else:
        x, h = _add_rms_norm(x, delta, weight, eps)
    return x, qdq_nvfp4(h, input_global_scale)


def _silu_mul_act(gate_up: torch.Tensor, input_global_scale) -> torch.Tensor:
    return qdq_nvfp4(_silu_mul(gate_up), input_global_scale)


def _kv4(x: torch.Tensor) -> torch.Tensor:
    """KV4 quantize-dequantize of a cache write [B, Hkv, T, D], one dynamic tensor scale per row."""
    return torch.vmap(qdq_kv4)(x)


def _inductor_options() -> dict:
    """Inductor's kernels use programmatic dependent launch (on Hopper+; ``FP4REASON_PDL_INDUCTOR=0`` turns it
    off), so the NVFP4 projection after a norm starts streaming weights before the norm ends (H100, Qwen3-8B
    shapes, batch 1: 3.39 -> 3.26 ms per W4A16 step, 3.78 -> 3.43 W4A4; benchmarks/NOTES.md v8)."""
    pdl = os.environ.get("FP4REASON_PDL_INDUCTOR", "1") == "1"
    if pdl and hasattr(torch._inductor.config.triton, "enable_pdl"):
        return {"triton.enable_pdl": True}
    return {}


class _Compiled:
    """torch.compile'd ``fn`` that falls back to eager ``fn`` for good if compiling it fails."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.failed = fn, False
        self.compiled = torch.compile(fn, fullgraph=True, options=_inductor_options() or None)

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                warnings.warn(
                    f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {e}); eager",
                    stacklevel=2,
                )
                self.failed = True
        return self.fn(*args)


_COMPILED: dict[str, _Compiled] = {}


def _compiled(fn: Callable) -> Callable:
    """One compiled wrapper per function for the whole process, so engines share compiled code."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = _Compiled(fn)
    return _COMPILED[fn.__name__]


def _act_kernels(ops: "Ops") -> None:
    """On CUDA, W4A4's folded input quantizations run as the one-launch Triton kernels of
    ``fp4reason.kernels.norm_act`` / ``fakequant`` (exact NVFP4, PDL) instead of inductor's split kernels.
    (Plain norms and silu * up stay inductor's: the Triton ones were no faster, benchmarks/NOTES.md v9.)
    """
    try:
        from fp4reason.kernels import fakequant, norm_act
        from fp4reason.kernels.cuda import pdl_enabled
    except ImportError:  # no triton: the compiled torch versions
        return
    norm_slow, silu_slow, act_slow = ops.norm_act, ops.silu_mul_act, ops.act_nvfp4

    def on_gpu(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
        ok = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] % 16 == 0
        return ok and (weight is None or weight.dtype == x.dtype)

    def fast(x: torch.Tensor, gs) -> bool:
        return gs is not None and on_gpu(x)

    def norm_act_(x, delta, weight, eps: float, gs):
        if gs is not None and on_gpu(x, weight):
            return norm_act.rms_norm_act(x, delta, weight, eps, gs)
        return norm_slow(x, delta, weight, eps, gs)

    def silu_mul_act_(gate_up, gs):
        if fast(gate_up, gs) and gate_up.shape[-1] % 32 == 0:
            return norm_act.silu_mul_act(gate_up, gs)
        return silu_slow(gate_up, gs)

    def act_nvfp4_(x, gs):
        return fakequant.qdq_nvfp4(x, gs, pdl=pdl_enabled(x.device)) if fast(x, gs) else act_slow(x, gs)

    ops.norm_act, ops.silu_mul_act, ops.act_nvfp4 = norm_act_, silu_mul_act_, act_nvfp4_


class Ops:
    """The pointwise pieces of a layer; ``compiled=True`` uses torch.compile'd versions (GPU decode).

    Only tensor arguments cross these functions, so one compiled graph serves every layer; the
    projections and attention stay outside and run as their own kernels (captured by the CUDA graph).
    ``fold_act`` (default: with ``compiled``): NVFP4 W4A4 projections get their input already quantized
    by the norm or silu*mul before them (``norm_act``, ``silu_mul_act``) instead of by a kernel of its own;
    compiled on CUDA these are hand-written Triton kernels (``_act_kernels``).
    """

    def __init__(self, compiled: bool = False, fold_act: bool | None = None) -> None:
        wrap = _compiled if compiled else (lambda f: f)
        self.compiled = compiled
        self.fold_act = compiled if fold_act is None else fold_act
        self.rms_norm, self.add_rms_norm, self.qkv_heads, self.silu_mul, self.kv4, self.attn_math = map(
            wrap, (_rms_norm, _add_rms_norm, _qkv_heads, _silu_mul, _kv4, _attn_math)
        )
        self.act_nvfp4, self.norm_act, self.silu_mul_act = map(wrap, (_act_nvfp4, _norm_act, _silu_mul_act))
        if compiled:
            _act_kernels(self)


def _fp4_weight(m: nn.Module):
    return getattr(m, "weight_fp4", None)


def _act_quant(m: nn.Module) -> bool:
    scheme = getattr(m, "scheme", None)
    return bool(getattr(scheme, "act_quant", False))


def _same(tensors: list[torch.Tensor | None]) -> bool:
    first = tensors[0]
    if first is None:
        return all(t is None for t in tensors)
    return all(t is not None and torch.equal(t, first) for t in tensors[1:])


class Projection:
    """One or several linears of the same input, fused into one matmul where the weights allow it.

    Plain ``nn.Linear`` weights are concatenated once and the HF modules are re-pointed at views of the
    fused tensor (no second copy of the weights). ``FP4Linear`` groups with equal tensor scales (and equal
    input scales for W4A4) become one FP4 weight, prepared once for the CUDA kernel and called through
    ``fp4reason.kernels``. Groups that cannot be fused run as one projection per module; modules of
    other types are called as they are. ``gated`` (a SwiGLU MLP's [gate, up]): on CUDA a fused NVFP4 weight is
    tiled for the kernel's silu(gate) * up epilogue and the call returns that product (``self.gated``).
    Dense weights run through ``F.linear`` (cuBLAS): the dense small-M kernel measured slower end to end
    (benchmarks/NOTES.md v17).
    """

    def __init__(self, modules: list[nn.Module], fuse: bool = True, gated: bool = False) -> None:
        self.kind, self.bias, self.parts, self.gated = "module", None, [], False
        fp4 = [_fp4_weight(m) for m in modules]
        if len(modules) > 1 and not (fuse and (_all_dense(modules) or _fusable_fp4(modules, fp4))):
            self.kind, self.parts = "parts", [Projection([m]) for m in modules]
        elif _all_dense(modules):
            self._init_dense(modules)
        elif all(w is not None for w in fp4) and _fusable_fp4(modules, fp4):
            self._init_fp4(modules, fp4, gated and len(modules) == 2)
        else:
            self.module = modules[0]

    def _init_dense(self, modules: list[nn.Module]) -> None:
        self.kind = "dense"
        if len(modules) == 1:
            self.weight, self.bias = modules[0].weight, modules[0].bias
            return
        with torch.no_grad():
            self.weight = torch.cat([m.weight for m in modules])
            a = 0
            for m in modules:
                b = a + m.weight.shape[0]
                m.weight.data = self.weight[a:b]  # the HF model keeps working, on views of the fused weight
                a = b
            if any(m.bias is not None for m in modules):
                self.bias = torch.cat(
                    [m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in modules]
                )

    def _init_fp4(self, modules: list[nn.Module], weights: list, gated: bool) -> None:
        self.kind = "fp4"
        w0 = weights[0]
        self.fmt = "nvfp4" if isinstance(w0, NVFP4Tensor) else "mxfp4"
        if len(weights) == 1:
            self.weight = w0
        elif isinstance(w0, NVFP4Tensor):
            self.weight = NVFP4Tensor.cat(weights)
        else:
            self.weight = MXFP4Tensor(
                torch.cat([w.packed for w in weights]), torch.cat([w.scale for w in weights])
            )
        biases = [getattr(m, "bias", None) for m in modules]
        if any(b is not None for b in biases):
            ref = next(b for b in biases if b is not None)
            self.bias = torch.cat(
                [
                    b if b is not None else ref.new_zeros(w.shape[0])
                    for b, w in zip(biases, weights, strict=True)
                ]
            )
        if self.fmt == "nvfp4" and self.weight.device.type == "cuda":
            from fp4reason.kernels import prepare_nvfp4

            n, k = self.weight.shape
            self.gated = gated and n % 16 == 0 and k % 128 == 0 and weights[0].shape[0] * 2 == n
            # the kernel's layout and workspace, before any capture
            self.weight = prepare_nvfp4(self.weight, gated=self.gated)
        self.act_quant = _act_quant(modules[0])
        self.input_global_scale = getattr(modules[0], "input_global_scale", None)
        self.dense_cache = None  # CPU only: the exactly dequantized weight, made once

    def folds_act(self, ops: "Ops") -> bool:
        """Whether the caller quantizes this projection's input (``ops.fold_act``, NVFP4 W4A4 only)."""
        return ops.fold_act and self.kind == "fp4" and self.fmt == "nvfp4" and self.act_quant

    def folds_norm(self, x: torch.Tensor) -> bool:
        """Whether :meth:`norm_linear` runs the add + RMSNorm inside the kernel for input ``x`` [..., K]
        (``FP4REASON_NORM_FOLD`` tokens at most; NVFP4 W4A16 on CUDA)."""
        return (
            self.kind == "fp4"
            and self.fmt == "nvfp4"
            and not self.act_quant
            and x.is_cuda
            and 0 < x.numel() // x.shape[-1] <= _NORM_FOLD
        )

    def norm_linear(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
        """(this projection of RMSNorm(x + delta), x + delta), the add and norm in the kernel."""
        from fp4reason import kernels

        x2, d2 = x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1])
        y, h = kernels.nvfp4_norm_linear(x2, weight, eps, self.weight, self.bias, delta=d2, gated=self.gated)
        return y.reshape(*x.shape[:-1], y.shape[-1]), h.reshape(x.shape)

    def __call__(self, x: torch.Tensor, ops: "Ops | None" = None, quantized: bool = False) -> torch.Tensor:
        """``quantized``: ``x`` already went through this projection's input quantization."""
        if self.kind == "dense":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "fp4":
            from fp4reason import kernels

            x2 = x.reshape(-1, x.shape[-1])
            if x2.device.type == "cpu":  # the reference math with the dequantization done once, not per call
                if self.dense_cache is None or self.dense_cache.dtype != x2.dtype:
                    self.dense_cache = self.weight.dequantize(x2.dtype)
                if self.act_quant and not quantized:
                    x2 = qdq_nvfp4(x2, self.input_global_scale) if self.fmt == "nvfp4" else qdq_mxfp4(x2)
                y = F.linear(x2, self.dense_cache, self.bias)
            elif self.fmt == "nvfp4":
                act_quant = self.act_quant and not quantized
                if act_quant and ops is not None and ops.compiled:  # one fused kernel instead of ~20
                    x2, act_quant = ops.act_nvfp4(x2, self.input_global_scale), False
                y = (kernels.nvfp4_silu_mul if self.gated else kernels.nvfp4_linear)(
                    x2,
                    self.weight,
                    self.bias,
                    act_quant=act_quant,
                    input_global_scale=self.input_global_scale,
                )
            else:
                y = kernels.mxfp4_linear(x2, self.weight, self.bias, act_quant=self.act_quant)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if self.kind == "parts":
            return torch.cat([p(x, ops) for p in self.parts], dim=-1)
        return self.module(x)

    @property
    def nbytes(self) -> int:
        """Bytes read from memory per call (weights + bias), for roofline accounting."""
        if self.kind == "parts":
            return sum(p.nbytes for p in self.parts)
        if self.kind == "module":
            return _module_nbytes(self.module)
        w = _nbytes(self.weight) if self.kind == "fp4" else self.weight.numel() * self.weight.element_size()
        return w + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)


def _all_dense(modules: list[nn.Module]) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _fusable_fp4(modules: list[nn.Module], weights: list) -> bool:
    """FP4 weights of one format whose scales allow one fused call (same tensor and input scales)."""
    if len({type(w) for w in weights}) != 1 or type(weights[0]) not in (NVFP4Tensor, MXFP4Tensor):
        return False
    if len({_act_quant(m) for m in modules}) != 1:
        return False
    if isinstance(weights[0], NVFP4Tensor):
        if not _same([w.global_scale for w in weights]):
            return False
        if _act_quant(modules[0]) and not _same([getattr(m, "input_global_scale", None) for m in modules]):
            return False
    return True


def _nbytes(w) -> int:
    """Bytes of an FP4 weight object: its ``nbytes`` or the sum of its tensors (kernel-specific layouts)."""
    n = getattr(w, "nbytes", None)
    if n is not None:
        return n
    return sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))


def _module_nbytes(m: nn.Module) -> int:
    fp4 = _fp4_weight(m)
    n = _nbytes(fp4) if fp4 is not None else 0
    return n + sum(t.numel() * t.element_size() for t in m.parameters())


class Layer:
    """One decoder layer: pre-norm attention with RoPE and GQA, then a pre-norm SwiGLU MLP."""

    def __init__(self, hf_layer: nn.Module, cfg, fuse: bool) -> None:
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.qkv = Projection([attn.q_proj, attn.k_proj, attn.v_proj], fuse)
        self.o = Projection([attn.o_proj], fuse)
        act = getattr(cfg, "hidden_act", "silu")
        self.act_fn: Callable | None = None if act == "silu" else mlp.act_fn
        gated = self.act_fn is None and _GATED_MLP
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj], fuse, gated=gated)
        self.down = Projection([mlp.down_proj], fuse)
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.in_norm, self.post_norm = hf_layer.input_layernorm, hf_layer.post_attention_layernorm
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the decoder's cos/sin tables [S, D]
        self.attn_counters: torch.Tensor | None = None  # the Triton attention's split counters (all zero)
        self.k_shift = getattr(attn, "k_shift", None)  # Q-FIT (fp4reason.quant.kshift): KV4 writes only

    def _norm_proj(self, x, delta, norm: nn.Module, proj: Projection, ops: Ops):
        """(residual stream, ``proj(norm(x + delta))``); ``delta`` is None for the first layer's input."""
        w, eps = norm.weight, _eps(norm)
        if delta is not None and proj.folds_norm(x):
            y, x = proj.norm_linear(x, delta, w, eps)
            return x, y
        if proj.folds_act(ops):
            x, h = ops.norm_act(x, delta, w, eps, proj.input_global_scale)
            return x, proj(h, ops, quantized=True)
        x, h = (x, ops.rms_norm(x, w, eps)) if delta is None else ops.add_rms_norm(x, delta, w, eps)
        return x, proj(h, ops)

    def _norm_qkv(self, x, delta, cos, sin, ops: Ops):
        """(residual stream, q, k, v) after adding ``delta`` (the previous layer's MLP output, or None)."""
        x, qkv = self._norm_proj(x, delta, self.in_norm, self.qkv, ops)
        qn, kn = self.q_norm, self.k_norm
        q, k, v = ops.qkv_heads(
            qkv,
            qn.weight if qn is not None else None,
            kn.weight if kn is not None else None,
            cos,
            sin,
            _eps(qn) if qn is not None else 0.0,
            self.n_heads,
            self.n_kv,
        )
        return x, q, k, v

    def _mlp(self, x: torch.Tensor, attn_out: torch.Tensor, ops: Ops):
        """(residual stream, MLP output): the MLP output is added by the next norm (fused)."""
        x, gu = self._norm_proj(x, attn_out, self.post_norm, self.gate_up, ops)
        if self.gate_up.gated:  # the kernel's epilogue applied silu(gate) * up
            if self.down.folds_act(ops):
                return x, self.down(ops.act_nvfp4(gu, self.down.input_global_scale), ops, quantized=True)
            return x, self.down(gu, ops)
        if self.act_fn is None and self.down.folds_act(ops):
            return x, self.down(ops.silu_mul_act(gu, self.down.input_global_scale), ops, quantized=True)
        if self.act_fn is None:
            a = ops.silu_mul(gu)
        else:
            gate, up = gu.chunk(2, dim=-1)
            a = self.act_fn(gate) * up
        return x, self.down(a, ops)

    def prefill(self, x, delta, cos, sin, valid, mask, kv4: bool, ops: Ops):
        """x [B, T, H] at cache slots 0..T-1; ``valid`` [B, 1, T, 1] marks real (non-pad) tokens."""
        b, t, _ = x.shape
        x, q, k, v = self._norm_qkv(x, delta, cos, sin, ops)
        if kv4 and self.k_shift is not None:  # softmax ignores q . k_shift; only the KV4 error changes
            k = k - self.k_shift.to(k.dtype)
        k, v = k * valid, v * valid  # pad slots hold zeros: they never enter a KV4 scale or an attention row
        if kv4:
            k, v = ops.kv4(k), ops.kv4(v)
        self.k_cache[:b, :, :t] = k
        self.v_cache[:b, :, :t] = v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        return self._mlp(x, self.o(y.transpose(1, 2).reshape(b, t, -1), ops), ops)

    def decode(self, x, delta, cos, sin, slot, start, mask, kv_len: int, kv4: bool, ops: Ops, attn: str):
        """x [B, 1, H] written at cache slot ``slot`` (a device tensor [1]); attends to slots < kv_len."""
        b = x.shape[0]
        if attn == "triton" and not kv4:  # q/k norms, RoPE, cache write and attention: one kernel
            x, qkv = self._norm_proj(x, delta, self.in_norm, self.qkv, ops)
            gs = self._o_input_scale(ops)
            y = self._triton_attn(qkv, slot, start, kv_len, fused=True, out_global_scale=gs)
            return self._mlp(x, self.o(y.reshape(b, 1, -1), ops, quantized=gs is not None), ops)
        x, q, k, v = self._norm_qkv(x, delta, cos, sin, ops)
        if kv4 and self.k_shift is not None:
            k = k - self.k_shift.to(k.dtype)
        if kv4:
            k, v = ops.kv4(k), ops.kv4(v)
        kc, vc = self.k_cache[:b], self.v_cache[:b]
        kc.index_copy_(2, slot, k)
        vc.index_copy_(2, slot, v)
        if attn == "triton":  # KV4 keeps the torch write path above; the kernel only attends
            gs = self._o_input_scale(ops)
            y = self._triton_attn(q, slot, start, kv_len, fused=False, out_global_scale=gs)
            return self._mlp(x, self.o(y.reshape(b, 1, -1), ops, quantized=gs is not None), ops)
        # GQA without repeating K/V: the query heads of one KV head become that head's "query positions"
        q = q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        kc, vc = kc[:, :, :kv_len], vc[:, :, :kv_len]
        if attn == "math":
            y = ops.attn_math(q, kc, vc, mask, self.scaling)
        else:
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scaling)
        return self._mlp(x, self.o(y.reshape(b, 1, -1), ops), ops)

    def _o_input_scale(self, ops: Ops) -> torch.Tensor | None:
        """o_proj's static W4A4 input scale when the attention kernel is to quantize its output, else None."""
        if not (_ATTN_QUANT and self.o.folds_act(ops)):
            return None
        gs = self.o.input_global_scale
        return gs if gs is not None and gs.dtype == torch.float32 else None

    def _triton_attn(self, q, slot, start, kv_len: int, fused: bool, out_global_scale=None) -> torch.Tensor:
        from fp4reason.engine.attention import decode_attention

        qn, kn = self.q_norm, self.k_norm
        return decode_attention(
            q,
            self.k_cache,
            self.v_cache,
            slot,
            start,
            n_heads=self.n_heads,
            n_kv=self.n_kv,
            scale=self.scaling,
            kv_len=kv_len,
            fused=fused,
            cos=self.rope[0],
            sin=self.rope[1],
            q_norm=qn.weight if qn is not None else None,
            k_norm=kn.weight if kn is not None else None,
            eps=_eps(qn) if qn is not None else 0.0,
            counters=self.attn_counters,
            out_global_scale=out_global_scale,
        )


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def _rope_tables(
    hf_model: nn.Module, n: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, D] for positions 0..n-1 from the HF rotary module (so every RoPE scaling type agrees)."""
    rotary = hf_model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"RoPE type '{rope_type}' depends on the sequence length; not supported")
    pos = torch.arange(n, device=device)[None]
    cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), pos)
    return cos[0].to(dtype), sin[0].to(dtype)


class FastDecoder:
    """The decoder: HF embeddings, norms, projections and lm_head, our own attention and KV cache."""

    def __init__(
        self,
        hf_model: nn.Module,
        *,
        max_batch_size: int,
        max_seq_len: int,
        kv4: bool,
        fuse: bool = True,
        attn: str = "sdpa",
    ):
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_ARCHS:
            raise ValueError(
                f"unsupported architecture '{cfg.model_type}'; the engine runs {', '.join(SUPPORTED_ARCHS)}"
            )
        if getattr(cfg, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention is not supported by the engine")
        if attn not in ("sdpa", "math", "triton"):
            raise ValueError(f"attn must be 'sdpa', 'math' or 'triton', got {attn!r}")
        if attn == "triton":
            from fp4reason.engine.attention import available

            why = available(hf_model.model.embed_tokens.weight.device)
            if why is not None:
                raise RuntimeError(why)
        self.config, self.kv4, self.attn = cfg, kv4, attn
        self.embed = hf_model.model.embed_tokens
        self.norm = hf_model.model.norm
        self.lm_head = hf_model.lm_head
        self.layers = [Layer(layer, cfg, fuse) for layer in hf_model.model.layers]
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.cos, self.sin = _rope_tables(hf_model, max_seq_len, self.dtype, self.device)
        l0 = self.layers[0]
        shape = (max_batch_size, l0.n_kv, max_seq_len, l0.head_dim)
        counters = torch.zeros(max_batch_size * l0.n_kv, dtype=torch.int32, device=self.device)
        for layer in self.layers:
            layer.attn_counters = counters  # each kernel leaves them zero for the next
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.rope = (self.cos, self.sin)
        self.ops = Ops()  # decode ops (compiled on GPU); prefill always runs eager ops
        self.eager_ops = Ops()

    def _logits(self, x: torch.Tensor, delta: torch.Tensor, ops: Ops) -> torch.Tensor:
        return self.lm_head(ops.add_rms_norm(x, delta, self.norm.weight, _eps(self.norm))[1])

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts ``tokens`` [B, T] (row b real from ``start[b]``); logits [B, V] of the
        last position."""
        b, t = tokens.shape
        pos = (torch.arange(t, device=self.device)[None] - start[:, None]).clamp(min=0)
        cos, sin = self.cos[pos], self.sin[pos]
        s = torch.arange(t, device=self.device)
        real = s[None] >= start[:, None]  # [B, T]
        # causal over real tokens; a pad query sees only itself so its (discarded) row stays finite
        mask = (real[:, None, :] & (s[None, None, :] <= s[None, :, None])) | torch.eye(
            t, dtype=torch.bool, device=self.device
        )
        mask = _additive(mask[:, None], self.dtype)  # [B, 1, T, T]
        valid = real[:, None, :, None].to(self.dtype)
        x, delta = self.embed(tokens), None
        for layer in self.layers:
            x, delta = layer.prefill(x, delta, cos, sin, valid, mask, self.kv4, self.eager_ops)
        return self._logits(x[:, -1], delta[:, -1], self.eager_ops)

    def decode(
        self, tokens: torch.Tensor, slot: torch.Tensor, start: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """One token per row, ``tokens`` [B] written at cache slot ``slot`` [1]; logits [B, V].

        Only device tensors and the static ``kv_len`` enter, so this can be captured in a CUDA graph.
        """
        cos = sin = mask = None  # the fused Triton kernel gathers RoPE itself and masks by start/slot
        if self.attn != "triton" or self.kv4:
            pos = slot - start  # [B]
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, D]
        if self.attn != "triton":
            s = torch.arange(kv_len, device=self.device)
            mask = _additive(((s[None] >= start[:, None]) & (s[None] <= slot))[:, None, None], self.dtype)
        x, delta = self.embed(tokens[:, None]), None
        for layer in self.layers:
            x, delta = layer.decode(
                x, delta, cos, sin, slot, start, mask, kv_len, self.kv4, self.ops, self.attn
            )
        return self._logits(x[:, 0], delta[:, 0], self.ops)

    def weight_bytes(self) -> int:
        """Bytes of weights read per decode step: projections, norms, lm_head (not the embedding table)."""
        n = sum(p.nbytes for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
        return n + _module_nbytes(self.lm_head)

    def kv_bytes_per_token(self) -> int:
        l0 = self.layers[0]
        return 2 * len(self.layers) * l0.n_kv * l0.head_dim * l0.k_cache.element_size()
