"""W4A4KV4 fake quantization for QAT (ReQAT's ``NVFP4_W4A4_E1M2_KV4`` setting).

* Every decoder ``nn.Linear``: NVFP4 weight and NVFP4 input, each with a dynamic per-tensor scale computed
  every forward; ``lm_head`` and embeddings stay high precision.
* Keys and values: KV4 (E1M2, E4M3 per 16 along head_dim, dynamic tensor scale) as they enter attention,
  after RoPE and after subtracting the Q-FIT key shift ``module.k_shift`` when the layer has one; queries
  are not quantized.
* Straight-through gradients everywhere (``fp4reason.formats.qdq_*`` under ``straight_through``, the
  composition ``fake_quantize_*`` is, optionally with compiled quantize-dequantize kernels).

The K/V hook is an attention function registered with transformers' ``AttentionInterface`` under
:data:`ATTN_NAME`; it wraps whatever implementation the model used before (sdpa by default).
"""

import torch
from torch import nn

from fp4reason.formats import qdq_kv4, qdq_nvfp4, straight_through

ATTN_NAME = "fp4reason_qat_kv4"
_QDQ = {"nvfp4": qdq_nvfp4, "kv4": qdq_kv4}


def compile_fake_quant(enable: bool = True) -> None:
    """Use ``torch.compile``d quantize-dequantize kernels (one fused kernel each instead of ~20 eager ops);
    same numerics, the straight-through autograd stays eager. For GPU training throughput."""
    if enable:
        _QDQ.update(nvfp4=torch.compile(qdq_nvfp4, dynamic=True), kv4=torch.compile(qdq_kv4, dynamic=True))
    else:
        _QDQ.update(nvfp4=qdq_nvfp4, kv4=qdq_kv4)


def fq_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quant (dynamic tensor scale) with a straight-through gradient."""
    return straight_through(_QDQ["nvfp4"], x)


def fq_kv4(x: torch.Tensor) -> torch.Tensor:
    """KV4 fake quant (dynamic tensor scale) with a straight-through gradient."""
    return straight_through(_QDQ["kv4"], x)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose weight and input are NVFP4 fake-quantized (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fq_nvfp4(x), self._weight_q(), self.bias)

    def _weight_q(self) -> torch.Tensor:
        if torch.is_grad_enabled() or self.training:
            return fq_nvfp4(self.weight)
        # evaluation: quantize the weight once per weight version, not every forward
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        if getattr(self, "_wq_key", None) != key:
            self._wq, self._wq_key = _QDQ["nvfp4"](self.weight.detach()), key
        return self._wq


def _inner_attention(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module, "_fp4_inner_attn", "sdpa")
    if name == "eager":
        import importlib

        return importlib.import_module(type(module).__module__).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def kv4_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Subtract the Q-FIT key shift, fake-quantize K and V to KV4, then run the wrapped attention."""
    shift = getattr(module, "k_shift", None)
    if shift is not None:
        key = key - shift.to(key.dtype)
    if getattr(module, "_fp4_kv_quant", True):
        key, value = fq_kv4(key), fq_kv4(value)
    return _inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Register :data:`ATTN_NAME` (attention and its mask function, sdpa's) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kv4_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


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


def prepare_qat(model: nn.Module, *, weights: bool = True, kv: bool = True) -> nn.Module:
    """Turn a causal LM into its W4A4(KV4) fake-quant training form, in place; returns the model.

    Apply before wrapping the model with FSDP (the swap keeps parameter names, so state dicts still load).
    """
    register_attention()
    if weights:
        for name, mod in decoder_layers(model).named_modules():
            if type(mod) is nn.Linear:
                if mod.in_features % 16:
                    raise ValueError(
                        f"{name}: in_features={mod.in_features} not divisible by the NVFP4 block 16"
                    )
                mod.__class__ = QATLinear
    if kv:
        attns = attention_modules(model)
        inner = model.config._attn_implementation
        if inner == ATTN_NAME:
            inner = getattr(attns[0], "_fp4_inner_attn", "sdpa")
        if inner not in ("sdpa", "eager"):
            inner = "sdpa"
        for attn in attns:
            if attn.head_dim % 16:
                raise ValueError(f"head_dim={attn.head_dim} not divisible by the KV4 block 16")
            attn._fp4_inner_attn = inner
            attn._fp4_kv_quant = True
        model.set_attn_implementation(ATTN_NAME)
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_qat` (plain ``nn.Linear`` and the wrapped attention); k_shift buffers stay."""
    for mod in model.modules():
        if type(mod) is QATLinear:
            mod.__class__ = nn.Linear
            mod.__dict__.pop("_wq", None)
            mod.__dict__.pop("_wq_key", None)
    if model.config._attn_implementation == ATTN_NAME:
        model.set_attn_implementation(getattr(attention_modules(model)[0], "_fp4_inner_attn", "sdpa"))
    return model
