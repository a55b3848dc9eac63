"""W4A4KV4 fake quantization for QAT (ReQAT's ``NVFP4_W4A4_E1M2_KV4`` setting).

* Every decoder ``nn.Linear``: NVFP4 weight and NVFP4 input, each with a dynamic per-tensor scale computed
  every forward; ``lm_head`` and embeddings stay high precision.
* Keys and values: KV4 (E1M2, E4M3 per 16 along head_dim, dynamic tensor scale) as they enter attention,
  after RoPE and after subtracting the Q-FIT key shift ``module.k_shift`` when the layer has one; queries
  are not quantized.
* Straight-through gradients everywhere (``fp4reason.formats.qdq_*`` under ``straight_through``, the
  composition ``fake_quantize_*`` is). The quantize-dequantize itself runs on one of three backends
  (:func:`compile_fake_quant`): eager torch, the Triton kernels of ``fp4reason.kernels.fakequant`` (bit for
  bit the same; the default for CUDA tensors when triton imports), or ``torch.compile``d torch (the same on
  CPU; on CUDA not bit-exact: inductor divides approximately, seen in ``benchmarks/fakequant_bench.py``).

Two ways of doing less work with the same numbers (forward values and gradients bit for bit):
* q/k/v (and gate/up) read one input tensor: it is fake-quantized once and shared (``share_inputs``).
* ``step_weights``: every weight is fake-quantized once per model forward, in one batched call per weight
  shape, instead of once per Linear call (and again in each gradient-checkpointing recompute). Holds the
  quantized weights until the next forward; the whole model must be local (not FSDP-sharded).

The K/V hook is an attention function registered with transformers' ``AttentionInterface`` under
:data:`ATTN_NAME`; it wraps whatever implementation the model used before (sdpa by default).
"""

import importlib.util
import weakref
from collections import defaultdict

import torch
from torch import nn

from fp4reason.formats import qdq_kv4, qdq_nvfp4, straight_through
from fp4reason.formats.nvfp4 import BLOCK_SIZE, _quantize_blocks, nvfp4_global_scale
from fp4reason.quant.kshift import attention_modules, decoder_layers  # noqa: F401  (re-exported)

ATTN_NAME = "fp4reason_qat_kv4"


def qdq_nvfp4_stacked(w: torch.Tensor) -> torch.Tensor:
    """``qdq_nvfp4`` of each ``w[i]`` (its own dynamic tensor scale) of stacked weights [G, N, K] at once."""
    g = nvfp4_global_scale(w.detach().abs().amax(dim=(1, 2)))[:, None, None]
    q, _, step = _quantize_blocks(w, g, BLOCK_SIZE)
    return (q * step.unsqueeze(-1)).flatten(-2).to(w.dtype)


_TORCH = {"nvfp4": qdq_nvfp4, "kv4": qdq_kv4, "nvfp4_stacked": qdq_nvfp4_stacked}
_QDQ = dict(_TORCH)  # what fq_* call: each entry picks its backend (see compile_fake_quant)
_COMPILED: dict = {}
_TRITON: dict = {}
_BACKENDS = ("eager", "compiled", "triton")
_backend = {"cpu": "eager", "cuda": "eager"}  # set by compile_fake_quant below


def _fns(backend: str) -> dict:
    if backend == "triton":
        if not _TRITON:
            from fp4reason.kernels import fakequant as tri  # imports triton: only when first needed

            _TRITON.update(nvfp4=tri.qdq_nvfp4, kv4=tri.qdq_kv4, nvfp4_stacked=tri.qdq_nvfp4_stacked)
        return _TRITON
    if backend == "compiled":
        if not _COMPILED:  # one wrapper each per process, shared by every later call (and its compiled code)
            _COMPILED.update({k: torch.compile(f, dynamic=True) for k, f in _TORCH.items()})
        return _COMPILED
    return _TORCH


def _by_device(key: str, cpu: str, cuda: str):
    """``_fns(cuda)[key]`` for CUDA tensors (resolved at the first CUDA call), else ``_fns(cpu)[key]``."""
    cpu_fn = _fns(cpu)[key]

    def qdq(x: torch.Tensor, *args) -> torch.Tensor:
        return _fns(cuda)[key](x, *args) if x.is_cuda else cpu_fn(x, *args)

    return qdq


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def compile_fake_quant(enable: bool | str = True) -> None:
    """Choose the quantize-dequantize backend (the autograd stays eager). Eager and Triton agree bit for bit
    everywhere, compiled agrees with them on CPU only (module docstring).

    ``True``/``False``: ``torch.compile``d / eager torch kernels for CPU tensors, and for CUDA tensors the
    Triton kernels (two launches per call) when triton imports, else the same torch choice. A string forces
    one backend for every tensor: ``"eager"``, ``"compiled"`` or ``"triton"`` (CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``)."""
    if isinstance(enable, bool):
        cpu = "compiled" if enable else "eager"
        cuda = "triton" if _triton_importable() else cpu
    elif enable in _BACKENDS:
        cpu = cuda = enable
    else:
        raise ValueError(f"unknown fake-quant backend {enable!r}: True, False or one of {_BACKENDS}")
    _QDQ.update(_fns(cpu) if cpu == cuda else {k: _by_device(k, cpu, cuda) for k in _TORCH})
    _backend.update(cpu=cpu, cuda=cuda)


compile_fake_quant(False)  # the default: eager torch on CPU, Triton on CUDA


def backend_for(device: torch.device | str) -> str:
    """The backend the fake quantizers use now for tensors on ``device`` ("eager", "compiled" or "triton")."""
    return _backend["cuda" if torch.device(device).type == "cuda" else "cpu"]


def fq_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quant (dynamic tensor scale) with a straight-through gradient."""
    return straight_through(_QDQ["nvfp4"], x)


def fq_kv4(x: torch.Tensor) -> torch.Tensor:
    """KV4 fake quant (dynamic tensor scale) with a straight-through gradient."""
    return straight_through(_QDQ["kv4"], x)


# the last fake-quantized input {"ref" (weak, to the input), "version", "grad", "xq"}; dropped with the input
_last_input: dict = {}


def _forget(ref: weakref.ref) -> None:
    if _last_input.get("ref") is ref:
        _last_input.clear()


def _fq_input(x: torch.Tensor) -> torch.Tensor:
    """``fq_nvfp4(x)``, reused when ``x`` is the unchanged tensor the previous Linear got (q/k/v, gate/up)."""
    c, grad = _last_input, torch.is_grad_enabled()
    if c and c["ref"]() is x and c["version"] == x._version and c["grad"] == grad:
        return c["xq"]
    xq = fq_nvfp4(x)
    c.clear()
    c.update(ref=weakref.ref(x, _forget), version=x._version, grad=grad, xq=xq)
    return xq


class QATLinear(nn.Linear):
    """``nn.Linear`` whose weight and input are NVFP4 fake-quantized (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = _fq_input(x) if self.__dict__.get("_fp4_share_input", True) else fq_nvfp4(x)
        return nn.functional.linear(xq, self._weight_q(), self.bias)

    def _weight_q(self) -> torch.Tensor:
        if torch.is_grad_enabled() or self.training:
            step = self.__dict__.get("_step_wq")
            if step is not None and step[1] == self.weight._version and torch.is_grad_enabled():
                return step[0]
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


def _quantize_step_weights(model: nn.Module, args) -> None:
    """Forward pre-hook (``step_weights``): fake-quantize every QATLinear weight now, one call per shape."""
    linears = [m for m in model.modules() if type(m) is QATLinear]
    for m in linears:
        m.__dict__.pop("_step_wq", None)
    if not torch.is_grad_enabled():
        return
    groups = defaultdict(list)
    for m in linears:
        groups[(tuple(m.weight.shape), m.weight.dtype, m.weight.device)].append(m)
    for mods in groups.values():
        wq = straight_through(_QDQ["nvfp4_stacked"], torch.stack([m.weight for m in mods]))
        for m, w in zip(mods, wq.unbind(0), strict=True):
            m.__dict__["_step_wq"] = (w, m.weight._version)


def prepare_qat(
    model: nn.Module,
    *,
    weights: bool = True,
    kv: bool = True,
    share_inputs: bool = True,
    step_weights: bool = False,
) -> nn.Module:
    """Turn a causal LM into its W4A4(KV4) fake-quant training form, in place; returns the model.

    ``share_inputs`` / ``step_weights``: the same numbers with fewer quantize calls (module docstring).
    Apply before wrapping the model with FSDP (the swap keeps parameter names, so state dicts still load);
    ``step_weights`` needs the whole model on one device (no FSDP).
    """
    register_attention()
    if weights:
        for name, mod in decoder_layers(model).named_modules():
            if type(mod) in (nn.Linear, QATLinear):
                if mod.in_features % 16:
                    raise ValueError(
                        f"{name}: in_features={mod.in_features} not divisible by the NVFP4 block 16"
                    )
                mod.__class__ = QATLinear
                mod._fp4_share_input = share_inputs
        hook = model.__dict__.pop("_fp4_step_hook", None)
        if hook is not None:
            hook.remove()
        if step_weights:
            model._fp4_step_hook = model.register_forward_pre_hook(_quantize_step_weights)
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
    hook = model.__dict__.pop("_fp4_step_hook", None)
    if hook is not None:
        hook.remove()
    for mod in model.modules():
        if type(mod) is QATLinear:
            mod.__class__ = nn.Linear
            for attr in ("_wq", "_wq_key", "_step_wq", "_fp4_share_input"):
                mod.__dict__.pop(attr, None)
    if model.config._attn_implementation == ATTN_NAME:
        model.set_attn_implementation(getattr(attention_modules(model)[0], "_fp4_inner_attn", "sdpa"))
    return model
