"""Q-FIT (ReQAT): two attention-preserving transforms that make keys easier to quantize to KV4.

* A pre-RoPE channel scale ``s`` with ``s[p] == s[p + d/2]`` (RoPE rotates channels p and p+d/2 together,
  so a paired scale commutes with it): queries x s, keys / s, so ``q . k`` is unchanged. It is folded into
  the weights: ``q_proj``/``k_proj`` rows (and biases) for Qwen2/Llama, per KV head (every query head of a
  GQA group gets its KV head's scale); for Qwen3, whose RMS ``q_norm``/``k_norm`` undo any scale on the
  projection, into the norm weights (one head-shared ``s``).
* A post-RoPE key shift ``m``: a fixed buffer ``self_attn.k_shift`` [1, kv_heads, 1, head_dim] subtracted
  from every key before KV quantization; ``q . m`` is a constant per query, so softmax ignores it.

``s = s0 ** alpha_s`` with ``s0`` the per-pair key max |k| (pre-RoPE), ``m = alpha_m * mean`` of the scaled
post-RoPE keys; ``(alpha_s, alpha_m)`` per layer by grid search on calibration text, minimising the MSE of
causal attention output with KV4 keys and values against the unquantized attention. (The reference uses the
pre-RoPE mean and an unmasked, unscaled proxy; we follow the paper's post-RoPE mean and the real attention.)

At inference the shift is subtracted from keys after RoPE, before they enter the KV4 cache (``KV4Cache``,
the engine; a checkpoint carries it as ``k_shift.safetensors``); the scales need nothing (they are in the
weights). The shift storage helpers live in ``fp4reason.quant.kshift`` and are re-exported here.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fp4reason.formats import qdq_kv4
from fp4reason.quant.kshift import (  # noqa: F401  (re-exported: the train API keeps its old names)
    K_SHIFT_FILE,
    attention_modules,
    k_shift_state,
    load_k_shift,
    save_k_shift,
    set_k_shift,
)


@dataclass
class LayerFit:
    alpha_s: float
    alpha_m: float
    err_before: float  # KV4 attention MSE without Q-FIT
    err_after: float


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _has_qk_norm(attn: nn.Module) -> bool:
    return hasattr(attn, "q_norm") and hasattr(attn, "k_norm")


def _project(attn: nn.Module, hidden: torch.Tensor):
    """Pre-RoPE (post q/k-norm) queries, keys and values [B, heads, T, D] in float32."""
    d = attn.head_dim
    with torch.no_grad():
        q = attn.q_proj(hidden).unflatten(-1, (-1, d))
        k = attn.k_proj(hidden).unflatten(-1, (-1, d))
        v = attn.v_proj(hidden).unflatten(-1, (-1, d))
        if _has_qk_norm(attn):
            q, k = attn.q_norm(q), attn.k_norm(k)
    return (t.transpose(1, 2).float() for t in (q, k, v))


def capture_attention_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4
) -> list[list[tuple]]:
    """Run ``input_ids`` [N, T] through ``model`` and return, per layer, a list of (hidden, cos, sin)
    per batch, as the attention modules received them."""
    attns = attention_modules(model)
    store: list[list[tuple]] = [[] for _ in attns]

    def hook(i):
        def fn(mod, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            store[i].append((hidden.detach(), cos.detach().float(), sin.detach().float()))

        return fn

    handles = [a.register_forward_pre_hook(hook(i), with_kwargs=True) for i, a in enumerate(attns)]
    try:
        with torch.no_grad():
            for b in range(0, input_ids.shape[0], batch_size):
                model(input_ids[b : b + batch_size].to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return store


def _pair_max(k: torch.Tensor, shared: bool) -> torch.Tensor:
    """Per-pair max |k| over batch and tokens: [kv_heads, D] (or [D] head-shared), paired halves equal."""
    a = k.abs().amax(dim=(0, 2))  # [KV, D]
    if shared:
        a = a.amax(0)
    h1, h2 = a.chunk(2, dim=-1)
    m = torch.maximum(h1, h2)
    return torch.cat((m, m), dim=-1).clamp(min=1e-5)


def _head_scale(s: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``s`` as [KV, D] whether it is per head or head-shared."""
    return s.expand(kv_heads, -1) if s.ndim == 1 else s


def _attn(q, k, v, groups):
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.no_grad()
def fit_layer(
    attn: nn.Module, batches: list[tuple], grid: int = 20
) -> tuple[torch.Tensor, torch.Tensor, LayerFit]:
    """Grid-search ``(alpha_s, alpha_m)`` in ``{0, 1/grid, ..., (grid-1)/grid}^2`` for one attention layer.

    Returns the scale ``s`` ([D] for Qwen3-style q/k-norm layers, else [kv_heads, D]), the key shift
    [1, kv_heads, 1, D] and the fit record.
    """
    projected = [(*_project(attn, h), cos, sin) for h, cos, sin in batches]
    kvh = projected[0][1].shape[1]
    groups = projected[0][0].shape[1] // kvh
    shared = _has_qk_norm(attn)
    s0 = _pair_max(torch.cat([k for _, k, *_ in projected], dim=2), shared)
    refs = [_attn(_rope(q, c, s_), _rope(k, c, s_), v, groups) for q, k, v, c, s_ in projected]
    vq = [qdq_kv4(v) for _, _, v, _, _ in projected]
    alphas = [i / grid for i in range(grid)]
    best = None
    for a_s in alphas:
        s = _head_scale(s0**a_s, kvh)[None, :, None]  # [1, KV, 1, D]
        qs = [_rope(q * s.repeat_interleave(groups, 1), c, sn) for q, _, _, c, sn in projected]
        ks = [_rope(k / s, c, sn) for _, k, _, c, sn in projected]
        mean = torch.cat(ks, dim=2).mean(dim=(0, 2), keepdim=True)  # [1, KV, 1, D]
        for a_m in alphas:
            shift = a_m * mean
            err = sum(
                F.mse_loss(_attn(qq, qdq_kv4(kk - shift), vv, groups), r, reduction="sum").item()
                for qq, kk, vv, r in zip(qs, ks, vq, refs, strict=True)
            )
            if a_s == 0 and a_m == 0:
                err0 = err
            if best is None or err < best[0]:
                best = (err, a_s, a_m, shift)
    n = sum(r.numel() for r in refs)
    err, a_s, a_m, shift = best
    return s0**a_s, shift, LayerFit(a_s, a_m, err0 / n, err / n)


@torch.no_grad()
def kv4_attention_error(attn: nn.Module, batches: list[tuple]) -> float:
    """MSE of this layer's causal attention output with KV4 keys (minus its ``k_shift``) and values,
    against unquantized attention, on captured ``(hidden, cos, sin)`` batches."""
    total, n = 0.0, 0
    shift = getattr(attn, "k_shift", None)
    for h, c, sn in batches:
        q, k, v = _project(attn, h)
        groups = q.shape[1] // k.shape[1]
        q, k = _rope(q, c, sn), _rope(k, c, sn)
        ref = _attn(q, k, v, groups)
        kk = k if shift is None else k - shift.float()
        total += F.mse_loss(_attn(q, qdq_kv4(kk), qdq_kv4(v), groups), ref, reduction="sum").item()
        n += ref.numel()
    return total / n


@torch.no_grad()
def apply_scale(attn: nn.Module, s: torch.Tensor) -> None:
    """Fold the paired scale into the layer: queries x s, keys / s (float32 math, cast back)."""
    d = attn.head_dim
    if s.shape[-1] != d or s.shape[-1] % 2 or not torch.equal(s[..., : d // 2], s[..., d // 2 :]):
        raise ValueError(
            f"Q-FIT scale must be paired over head_dim={d} (s[p] == s[p+d/2]), got {tuple(s.shape)}"
        )
    if _has_qk_norm(attn):
        if s.ndim != 1:
            raise ValueError("q_norm/k_norm layers (Qwen3) take one head-shared scale [head_dim]")
        for norm, f in ((attn.q_norm, s), (attn.k_norm, 1 / s)):
            norm.weight.copy_((norm.weight.float() * f.to(norm.weight.device)).to(norm.weight.dtype))
        return
    kvh = attn.k_proj.out_features // d
    s = _head_scale(s, kvh).to(attn.k_proj.weight.device)
    groups = attn.q_proj.out_features // (kvh * d)
    for proj, f in ((attn.k_proj, 1 / s), (attn.q_proj, s.repeat_interleave(groups, 0))):
        f = f.reshape(-1)
        proj.weight.copy_((proj.weight.float() * f[:, None]).to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.copy_((proj.bias.float() * f).to(proj.bias.dtype))


def qfit(
    model: nn.Module, input_ids: torch.Tensor, *, grid: int = 20, batch_size: int = 4, progress: bool = True
) -> list[LayerFit]:
    """Calibrate and apply Q-FIT to every layer of ``model`` in place, on calibration ``input_ids`` [N, T]."""
    from tqdm import tqdm

    if input_ids.ndim != 2:
        raise ValueError(f"calibration input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
    store = capture_attention_inputs(model, input_ids, batch_size)
    fits = []
    for attn, batches in tqdm(
        list(zip(attention_modules(model), store, strict=True)), desc="Q-FIT", disable=not progress
    ):
        s, shift, fit = fit_layer(attn, batches, grid)
        apply_scale(attn, s)
        set_k_shift(attn, shift)
        fits.append(fit)
    return fits
