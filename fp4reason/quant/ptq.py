"""Post-training quantization, the RTN recipe of ModelOpt's default NVFP4 PTQ.

Every Linear inside the decoder layers is replaced by an FP4Linear (``lm_head`` and embeddings stay);
q/k/v and gate/up share one weight tensor scale (so fused kernels can concatenate them); for NVFP4 A4 the
static input tensor scales come from max calibration of the unquantized model on calibration text.
"""

import re
from importlib import resources

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fp4reason.formats import nvfp4_global_scale
from fp4reason.quant.kv4 import enable_kv4
from fp4reason.quant.linear import FP4Linear
from fp4reason.quant.scheme import Scheme, get_scheme, quantization_config

SUPPORTED_ARCHS = ("qwen2", "qwen3", "llama", "mistral")
# projections that a fused kernel concatenates: they share one weight (and input) tensor scale
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def check_architecture(model: nn.Module) -> None:
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules inside the decoder layers, by qualified name (not lm_head / embeddings)."""
    check_architecture(model)
    found = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.search(r"\.layers\.\d+\.", n)
    }
    if not found:
        raise ValueError(f"no decoder Linear layers found in {type(model).__name__}")
    return found


def fused_groups(names) -> list[list[str]]:
    """Group module names sharing a tensor scale: q/k/v and gate/up of one layer; others alone."""
    names, groups, seen = list(names), [], set()
    for name in names:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        group = [name]
        for fused in FUSED_GROUPS:
            if leaf in fused:
                group = [f"{parent}.{p}" for p in fused if f"{parent}.{p}" in names]
        seen.update(group)
        groups.append(group)
    return groups


def calibration_text() -> str:
    """The built-in calibration text (varied English and math prose, ~20 KB)."""
    return resources.files("fp4reason").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_batches(calib_data, tokenizer=None, seq_len: int = 512) -> list[torch.Tensor]:
    """Turn ``calib_data`` (None, list of str, list of id lists, 1-D/2-D id tensor) into [1, T] id tensors."""
    if calib_data is None:
        calib_data = [calibration_text()]
    if isinstance(calib_data, str):
        calib_data = [calib_data]
    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data] if calib_data.ndim == 1 else list(calib_data)
    ids = []
    for item in calib_data:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("calibration text needs a tokenizer: pass tokenizer=... to quantize_model")
            ids.append(torch.tensor(tokenizer(item, add_special_tokens=False)["input_ids"], dtype=torch.long))
        else:
            t = torch.as_tensor(item, dtype=torch.long)
            if t.ndim != 1:
                raise ValueError(f"calibration token ids must be 1-D sequences, got shape {tuple(t.shape)}")
            ids.append(t)
    batches = [chunk for t in ids for chunk in t.split(seq_len) if len(chunk) > 0]
    if not batches:
        raise ValueError("calibration data is empty")
    return [b.unsqueeze(0) for b in batches]


@torch.no_grad()
def calibrate_input_amax(model: nn.Module, modules: dict[str, nn.Module], batches, progress: bool = True):
    """Max calibration: amax over all calibration tokens of each module's input (float32 scalars)."""
    amax = {n: torch.zeros((), dtype=torch.float32) for n in modules}

    def hook(name):
        def fn(_, args):
            amax[name] = torch.maximum(amax[name], args[0].detach().abs().amax().float().cpu())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    device = next(model.parameters()).device
    try:
        for ids in tqdm(batches, desc="calibrating", disable=not progress):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


@torch.no_grad()
def quantize_model(
    model: nn.Module, scheme: "str | Scheme", calib_data=None, *, tokenizer=None, progress: bool = True
) -> nn.Module:
    """Quantize ``model``'s decoder Linears to ``scheme`` in place and return it.

    ``calib_data`` (NVFP4 A4 only): list of str (needs ``tokenizer``), list/tensor of token ids, or None for
    the built-in calibration text. Sets ``model.config.quantization_config`` (compressed-tensors form).
    """
    scheme = get_scheme(scheme)
    if getattr(model.config, "quantization_config", None) or any(
        isinstance(m, FP4Linear) for m in model.modules()
    ):
        raise ValueError("model is already quantized")
    linears = decoder_linears(model)
    for name, lin in linears.items():
        if lin.in_features % scheme.block_size:
            raise ValueError(
                f"{name}: in_features K={lin.in_features} is not divisible by the "
                f"{scheme.weight_format} block size {scheme.block_size}"
            )
    groups = fused_groups(linears)

    input_scale = {}
    if scheme.act_quant and scheme.weight_format == "nvfp4":
        if calib_data is None and tokenizer is None:
            raise ValueError(
                f"scheme {scheme.name} calibrates activation scales on text: pass a tokenizer "
                "(for the built-in calibration text) or calib_data token ids"
            )
        amax = calibrate_input_amax(model, linears, calibration_batches(calib_data, tokenizer), progress)
        for group in groups:
            g = nvfp4_global_scale(torch.stack([amax[n] for n in group]).amax())
            input_scale.update({n: g for n in group})

    for group in tqdm(groups, desc=f"quantizing {scheme.name}", disable=not progress):
        wgs = None
        if scheme.weight_format == "nvfp4":
            wgs = nvfp4_global_scale(
                torch.stack([linears[n].weight.detach().abs().amax().float() for n in group]).amax()
            )
        for name in group:
            parent, _, leaf = name.rpartition(".")
            new = FP4Linear.from_linear(
                linears[name], scheme, weight_global_scale=wgs, input_global_scale=input_scale.get(name)
            )
            setattr(model.get_submodule(parent), leaf, new)

    model.config.quantization_config = quantization_config(scheme)
    if scheme.kv_quant:
        enable_kv4(model)
    return model
