"""Q-FIT post-RoPE key shifts: the per-layer buffers and their file, ``k_shift.safetensors``.

Q-FIT (``fp4reason.train.qfit``) gives each attention layer a fixed shift ``m`` [1, kv_heads, 1, head_dim]
that is subtracted from every key after RoPE, before the key is quantized to KV4. Attention is unchanged
(``q . (k - m) = q . k - q . m`` and ``q . m`` is one constant per query, which softmax ignores); only the
KV4 quantization error shrinks, because the shifted keys are centred. The shift lives on the module as the
non-persistent buffer ``self_attn.k_shift`` (float32) and on disk beside the weights as
``k_shift.safetensors`` with keys ``model.layers.{i}.self_attn.k_shift``. Every KV4 path subtracts
``k_shift.to(key.dtype)``: ``KV4Cache``, the engine's cache writes and the QAT fake-quant attention.
"""

import os
import re
from pathlib import Path

import torch
from torch import nn

K_SHIFT_FILE = "k_shift.safetensors"
_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.k_shift")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers at model.model.layers")
    return layers


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` module of each decoder layer; raises for architectures without q/k/v projections."""
    mods = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"layer {i}: unsupported attention (need self_attn.q_proj/k_proj/v_proj/o_proj)")
        mods.append(attn)
    return mods


def _shift_shape(attn: nn.Module) -> tuple[int, int, int, int]:
    cfg = attn.config
    head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (1, cfg.num_key_value_heads, 1, head_dim)


def set_k_shift(attn: nn.Module, shift: torch.Tensor) -> None:
    """Attach (or replace) the post-RoPE key shift buffer [1, kv_heads, 1, head_dim] (float32, untrained)."""
    shape = _shift_shape(attn)
    if tuple(shift.shape) != shape:
        raise ValueError(f"k_shift must have shape {list(shape)}, got {list(shift.shape)}")
    if not shift.is_floating_point() or not torch.isfinite(shift).all():
        raise ValueError("k_shift must hold finite floating-point values")
    device = next(iter(attn.state_dict().values())).device
    attn.register_buffer("k_shift", shift.detach().to(device, torch.float32), persistent=False)


def k_shifts(model: nn.Module) -> list[torch.Tensor | None] | None:
    """Each decoder layer's ``k_shift`` (None where a layer has none); None when no layer has one."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    shifts = [getattr(getattr(layer, "self_attn", None), "k_shift", None) for layer in layers]
    return shifts if any(s is not None for s in shifts) else None


def k_shift_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The shifts as a safetensors state dict (float32, CPU), only for layers that have one."""
    return {
        f"model.layers.{i}.self_attn.k_shift": a.k_shift.detach().float().cpu().contiguous()
        for i, a in enumerate(attention_modules(model))
        if getattr(a, "k_shift", None) is not None
    }


def save_k_shift(model: nn.Module, path: "str | os.PathLike") -> None:
    """Write the k_shift buffers to ``path`` (safetensors, atomically); raises if the model has none."""
    from safetensors.torch import save_file

    state = k_shift_state(model)
    if not state:
        raise ValueError("the model has no k_shift buffers to save (run Q-FIT first)")
    tmp = f"{path}.tmp"
    save_file(state, tmp, metadata={"format": "pt", "producer": "fp4reason", "content": "qfit k_shift"})
    os.replace(tmp, path)


def read_k_shift(path: "str | os.PathLike") -> dict[int, torch.Tensor]:
    """Layer index -> shift [1, kv_heads, 1, head_dim] from ``path``, validated (names, rank, finiteness)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such k_shift file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    out = {}
    for key, t in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{path}: unexpected key {key!r} (expected model.layers.<i>.self_attn.k_shift)")
        if t.ndim != 4 or t.shape[0] != 1 or t.shape[2] != 1:
            raise ValueError(f"{path}: {key} has shape {list(t.shape)}, expected [1, kv_heads, 1, head_dim]")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{path}: {key} must hold finite floating-point values")
        out[int(m.group(1))] = t
    if not out:
        raise ValueError(f"{path}: holds no k_shift tensors")
    return out


def load_k_shift(model: nn.Module, path: "str | os.PathLike", *, strict: bool = True) -> int:
    """Attach the shifts stored at ``path``; returns how many layers got one.

    ``strict`` (default) requires one shift per decoder layer: a Q-FIT model whose shifts are partly
    missing would silently run some layers with uncentred keys.
    """
    attns = attention_modules(model)
    shifts = read_k_shift(path)
    extra = sorted(i for i in shifts if i >= len(attns))
    if extra:
        raise ValueError(f"{path}: shifts for layers {extra} but the model has {len(attns)} layers")
    missing = [i for i in range(len(attns)) if i not in shifts]
    if strict and missing:
        raise ValueError(f"{path}: no k_shift for layers {missing} (the model has {len(attns)} layers)")
    for i, t in shifts.items():
        try:
            set_k_shift(attns[i], t)
        except ValueError as e:
            raise ValueError(f"{path}: layer {i}: {e}") from None
    return len(shifts)
