"""KV4: keys (post-RoPE) and values quantized to the ReQAT E1M2 format as they enter the KV cache.

Mechanism: ``KV4Cache`` is a transformers ``DynamicCache`` whose ``update`` stores ``qdq_kv4(new states)``
and so attends over the quantized cache; the tensor scale is dynamic over the tokens of that call (the
whole [B, H, T, D] of a prefill, the one new token of a decode step), as ReQAT's vLLM inference does.
``enable_kv4(model)`` adds a forward pre-hook that gives every forward a KV4Cache: a fresh one when none is
passed (also for ``use_cache=False``: the cache is then used for that forward and dropped), and the empty
DynamicCache that ``generate`` creates is replaced (generate then carries on with the returned one).
Consequences: a prefill equals an uncached forward exactly; a cached decode step quantizes each new token
with its own scale, so it differs slightly from re-running the whole sequence (as on a real KV4 cache).

Q-FIT: when a layer has a key shift (``self_attn.k_shift``, see ``fp4reason.quant.kshift``) the cache
stores ``qdq_kv4(key - shift)``. Attention over the shifted keys equals attention over the originals
(softmax ignores the per-query constant ``q . shift``); only the quantization error differs.
"""

import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, DynamicCache

from fp4reason.formats import qdq_kv4
from fp4reason.quant.kshift import k_shifts


class KV4Cache(DynamicCache):
    """DynamicCache that stores keys and values quantize-dequantized to 4-bit E1M2 (``qdq_kv4``).

    ``k_shift``: per layer, None or a Q-FIT key shift [1, kv_heads, 1, head_dim] subtracted from the keys
    (in their dtype) before quantization. ``enable_kv4`` models fill it from their layers' ``k_shift``.
    """

    def __init__(self, *args, k_shift: Sequence[torch.Tensor | None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k_shift = list(k_shift) if k_shift is not None else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        shift = self.k_shift[layer_idx] if self.k_shift is not None else None
        if shift is not None:
            key_states = key_states - shift.to(key_states.dtype)
        return super().update(qdq_kv4(key_states), qdq_kv4(value_states), layer_idx, *args, **kwargs)


def _cache_kwarg(module: nn.Module, kwargs: dict) -> str:
    """The keyword the cache travels under: the caller's, else the forward's own (transformers >= 5.2x
    calls it ``cache``, earlier releases ``past_key_values``; the old name is still accepted)."""
    for name in ("cache", "past_key_values"):
        if name in kwargs:
            return name
    return "cache" if "cache" in _positional_params(module) else "past_key_values"


def _kv4_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    key = _cache_kwarg(module, kwargs)
    if args and key in _positional_params(module)[: len(args)]:
        raise TypeError(f"pass {key} to a KV4 model as a keyword argument")
    cache = kwargs.get(key)
    if isinstance(cache, KV4Cache):
        if cache.k_shift is None:  # a cache made by the caller: the model's Q-FIT shifts still apply
            cache.k_shift = k_shifts(module)
        return None
    if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
        kwargs[key] = KV4Cache(config=module.config, k_shift=k_shifts(module))
        return args, kwargs
    if isinstance(cache, Cache):
        raise ValueError(
            f"a KV4 model needs a KV4Cache (or no cache); got a {type(cache).__name__} that already holds "
            f"{cache.get_seq_length()} tokens of unquantized keys/values"
        )
    raise TypeError(f"{key} must be a transformers Cache, got {type(cache).__name__}")


def _positional_params(module: nn.Module) -> list[str]:
    if "_kv4_params" not in module.__dict__:
        module.__dict__["_kv4_params"] = list(inspect.signature(module.forward).parameters)
    return module.__dict__["_kv4_params"]


def enable_kv4(model: nn.Module) -> nn.Module:
    """Make every forward (and ``generate``) of ``model`` use a KV4Cache. Idempotent."""
    if not uses_kv4(model):
        model._kv4_hook = model.register_forward_pre_hook(_kv4_pre_hook, with_kwargs=True)
    return model


def disable_kv4(model: nn.Module) -> nn.Module:
    if uses_kv4(model):
        model._kv4_hook.remove()
        del model._kv4_hook
    return model


def uses_kv4(model: nn.Module) -> bool:
    """True when ``model``'s keys and values are quantized to KV4 as they enter the cache."""
    return getattr(model, "_kv4_hook", None) is not None
