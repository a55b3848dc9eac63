"""Quantized checkpoints: compressed-tensors ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` (ours and
other producers'), and NVIDIA ModelOpt NVFP4 (``hf_quant_config.json``).

A checkpoint dir holds ``config.json`` (with ``quantization_config``), ``model.safetensors`` (or shards +
``model.safetensors.index.json``), optional generation config and tokenizer files. Per quantized Linear
``<p>``: compressed-tensors ``<p>.weight_packed`` uint8 [N, K/2], ``<p>.weight_scale`` (e4m3 [N, K/16] or
E8M0 uint8 [N, K/32]), ``<p>.weight_global_scale`` f32 [1] (nvfp4), ``<p>.input_global_scale`` f32 [1]
(nvfp4 A4). ModelOpt stores ``<p>.weight`` (same bytes), ``<p>.weight_scale``, ``<p>.weight_scale_2`` and
``<p>.input_scale`` (f32 scalars, *multipliers*: the inverses of the compressed-tensors divisors).
An optional ``k_shift.safetensors`` holds Q-FIT key shifts (``fp4reason.quant.kshift``): written when the
model has them, attached at load (every layer, validated), subtracted from keys by the KV4 cache.
Writes go to a temporary directory renamed into place; reads are safetensors only and validated.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fp4reason.quant.kshift import K_SHIFT_FILE, k_shift_state, load_k_shift, read_k_shift
from fp4reason.quant.kv4 import enable_kv4, uses_kv4
from fp4reason.quant.linear import FP4Linear
from fp4reason.quant.ptq import check_architecture
from fp4reason.quant.scheme import SCHEMES, Scheme, quantization_config, scheme_from_config

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MODELOPT_CONFIG = "hf_quant_config.json"


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, truncated or inconsistent; the message says what and where."""


# ----------------------------------------------------------------------------------------------- save


def _state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out, seen = {}, {}
    for name, t in sd.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:  # tied weights (lm_head = embed_tokens): store once, re-tie at load
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_quantized(model: nn.Module, out_dir: "str | os.PathLike", tokenizer=None) -> Path:
    """Write ``model`` (quantized by ``quantize_model``) as a compressed-tensors checkpoint, atomically."""
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or not any(isinstance(m, FP4Linear) for m in model.modules()):
        raise ValueError("save_quantized needs a model quantized with fp4reason.quant.quantize_model")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(
            _state_dict_to_save(model), tmp / WEIGHTS_NAME, metadata={"format": "pt", "producer": "fp4reason"}
        )
        shifts = k_shift_state(model)
        if shifts:
            save_file(shifts, tmp / K_SHIFT_FILE, metadata={"format": "pt", "producer": "fp4reason"})
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():  # replace: move the old dir aside first so a crash never leaves a half-written `out`
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------- read


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists():
        index = _read_json(path / INDEX_NAME)
        files = sorted(set((index.get("weight_map") or {}).values()))
        if not files:
            raise CheckpointError(f"{path / INDEX_NAME}: empty weight_map")
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: shard files listed in {INDEX_NAME} are missing: {missing}")
        return [path / f for f in files]
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: only pickle weights (*.bin/*.pt) found; fp4reason reads safetensors only"
        )
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def _headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple]]:
    """name -> (file, safetensors dtype string, shape), read from the headers only; validates each file."""
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    sl = sf.get_slice(name)
                    out[name] = (f, sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return out


def _load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    sd = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    sd[name] = sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return sd


def _checkpoint_kind(path: Path) -> tuple[str, dict, dict]:
    """(producer: "compressed-tensors" | "modelopt", config.json dict, quantization description)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: missing config.json")
    config = _read_json(path / "config.json")
    qc = config.get("quantization_config")
    if (path / MODELOPT_CONFIG).exists():
        q = _read_json(path / MODELOPT_CONFIG).get("quantization") or {}
        return "modelopt", config, q
    if isinstance(qc, dict) and qc.get("quant_method") == "modelopt":
        return "modelopt", config, qc
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: config.json has no quantization_config (not a quantized checkpoint)")
    return "compressed-tensors", config, qc


def _modelopt_scheme(q: dict) -> Scheme:
    algo = q.get("quant_algo")
    if algo not in ("NVFP4", "W4A16_NVFP4"):
        raise CheckpointError(f"ModelOpt quant_algo {algo!r} is not supported (need NVFP4 or W4A16_NVFP4)")
    if q.get("group_size", 16) != 16:
        raise CheckpointError(f"ModelOpt NVFP4 group_size must be 16, got {q.get('group_size')}")
    if q.get("kv_cache_quant_algo"):
        raise CheckpointError(f"ModelOpt kv_cache_quant_algo {q['kv_cache_quant_algo']!r} is not supported")
    return SCHEMES["nvfp4-w4a4" if algo == "NVFP4" else "nvfp4-w4a16"]


def _describe(path: "str | os.PathLike"):
    """(producer, config dict, scheme, {name: (file, dtype, shape)}, {quantized module prefix: FP4 names})."""
    path = Path(path)
    producer, config, qdesc = _checkpoint_kind(path)
    try:
        scheme = _modelopt_scheme(qdesc) if producer == "modelopt" else scheme_from_config(qdesc)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    headers = _headers(_weight_files(path))
    packed = "weight_scale_2" if producer == "modelopt" else "weight_packed"
    prefixes = sorted(n[: -len(packed) - 1] for n in headers if n.endswith("." + packed))
    if not prefixes:
        raise CheckpointError(f"{path}: no quantized layers (no '*.{packed}' tensors) in the weights")
    return producer, config, scheme, headers, prefixes


def _expected(scheme: Scheme, producer: str, n: int, k: int) -> dict[str, tuple[str, tuple]]:
    """Checkpoint tensor suffix -> (safetensors dtype, shape) for a quantized [N, K] Linear."""
    bs = scheme.block_size
    if producer == "modelopt":
        exp = {
            "weight": ("U8", (n, k // 2)),
            "weight_scale": ("F8_E4M3", (n, k // bs)),
            "weight_scale_2": ("F32", ()),
        }
        if scheme.act_quant:
            exp["input_scale"] = ("F32", ())
        return exp
    exp = {"weight_packed": ("U8", (n, k // 2))}
    if scheme.weight_format == "nvfp4":
        exp |= {"weight_scale": ("F8_E4M3", (n, k // bs)), "weight_global_scale": ("F32", (1,))}
        if scheme.act_quant:
            exp["input_global_scale"] = ("F32", (1,))
    else:
        exp["weight_scale"] = ("U8", (n, k // bs))
    return exp


def _validate(
    path, producer: str, scheme: Scheme, headers: dict, prefixes: list[str], model: nn.Module | None
):
    """Check every quantized layer's tensors (names, dtypes, shapes); ``model`` gives the expected [N, K]."""
    problems = []
    for p in prefixes:
        scale = headers.get(f"{p}.weight_scale")
        if model is not None:
            try:
                lin = model.get_submodule(p)
            except AttributeError:
                problems.append(f"{p}: no such module in a {model.config.model_type} model")
                continue
            n, k = lin.out_features, lin.in_features
            if k % scheme.block_size:
                fmt, bs = scheme.weight_format, scheme.block_size
                problems.append(f"{p}: K={k} is not divisible by the {fmt} block size {bs}")
                continue
        elif scale is not None and len(scale[2]) == 2:
            n, k = scale[2][0], scale[2][1] * scheme.block_size
        else:
            problems.append(f"{p}.weight_scale: missing or not 2-D")
            continue
        for suffix, (dtype, shape) in _expected(scheme, producer, n, k).items():
            got = headers.get(f"{p}.{suffix}")
            if got is None:
                problems.append(f"{p}.{suffix}: missing")
            elif got[1] != dtype:
                problems.append(f"{p}.{suffix}: dtype {got[1]}, expected {dtype}")
            elif got[2] != shape and not (
                suffix in ("weight_scale_2", "input_scale", "weight_global_scale", "input_global_scale")
                and got[2] in ((), (1,))
            ):
                problems.append(
                    f"{p}.{suffix}: shape {list(got[2])}, expected {list(shape)} for a [{n}, {k}] weight"
                )
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(f"{path}: invalid quantized tensors: " + "; ".join(problems[:10]) + more)


def is_quantized_checkpoint(path: "str | os.PathLike") -> bool:
    """True for a directory holding a compressed-tensors NVFP4/MXFP4 or a ModelOpt NVFP4 checkpoint."""
    try:
        producer, _, q = _checkpoint_kind(Path(path))
        (_modelopt_scheme if producer == "modelopt" else scheme_from_config)(q)
        return True
    except (ValueError, OSError):
        return False


def checkpoint_info(path: "str | os.PathLike") -> dict:
    """Summary of a quantized checkpoint from its headers: scheme, producer, layers, bytes, compression."""
    path = Path(path)
    producer, config, scheme, headers, prefixes = _describe(path)
    _validate(path, producer, scheme, headers, prefixes, None)
    files = _weight_files(path)
    file_bytes = sum(f.stat().st_size for f in files)
    numel = lambda shape: int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else 1  # noqa: E731
    elem = {"U8": 1, "F8_E4M3": 1, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "F64": 8, "BOOL": 1}
    quant_names = {f"{p}.{s}" for p in prefixes for s in _expected(scheme, producer, 1, scheme.block_size)}
    quant_bytes = sum(numel(headers[n][2]) * elem.get(headers[n][1], 4) for n in quant_names if n in headers)
    quant_params = sum(
        2 * numel(headers[f"{p}.{'weight' if producer == 'modelopt' else 'weight_packed'}"][2])
        for p in prefixes
    )
    other_params = sum(numel(s) for n, (_, _, s) in headers.items() if n not in quant_names)
    bf16_bytes = 2 * (quant_params + other_params)
    return {
        "path": str(path),
        "producer": producer,
        "scheme": scheme.name,
        "weight_format": scheme.weight_format,
        "act_quant": scheme.act_quant,
        "kv_quant": scheme.kv_quant,
        "architecture": config.get("model_type"),
        "quantized_layers": len(prefixes),
        "quantized_params": quant_params,
        "other_params": other_params,
        "quantized_bytes": quant_bytes,
        "file_bytes": file_bytes,
        "bf16_bytes": bf16_bytes,
        "compression_ratio": bf16_bytes / file_bytes if file_bytes else float("nan"),
        "files": [f.name for f in files],
        "k_shift_layers": _k_shift_layers(path, config),
    }


def _k_shift_layers(path: Path, config: dict) -> int:
    """How many layers have a Q-FIT key shift in ``k_shift.safetensors`` (0 without the file); validated."""
    if not (path / K_SHIFT_FILE).exists():
        return 0
    try:
        shifts = read_k_shift(path / K_SHIFT_FILE)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    text = config.get("text_config") or config
    n_layers, kvh = text.get("num_hidden_layers"), text.get("num_key_value_heads")
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if sorted(shifts) != list(range(n_layers)):
        raise CheckpointError(
            f"{path / K_SHIFT_FILE}: shifts for layers {sorted(shifts)}, expected one for each of {n_layers}"
        )
    for i, t in shifts.items():
        if tuple(t.shape) != (1, kvh, 1, head_dim):
            raise CheckpointError(
                f"{path / K_SHIFT_FILE}: layer {i} shift has shape {list(t.shape)}, "
                f"expected [1, {kvh}, 1, {head_dim}]"
            )
    return len(shifts)


def _module_tensors(producer: str, scheme: Scheme, sd: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Our FP4Linear buffers for one layer from checkpoint tensors (ModelOpt multipliers are inverted)."""
    if producer == "modelopt":
        out = {
            "weight_packed": sd.pop(f"{prefix}.weight"),
            "weight_scale": sd.pop(f"{prefix}.weight_scale"),
            "weight_global_scale": 1.0 / sd.pop(f"{prefix}.weight_scale_2").float().reshape(1),
        }
        if scheme.act_quant:
            out["input_global_scale"] = 1.0 / sd.pop(f"{prefix}.input_scale").float().reshape(1)
        return out
    names = [
        n
        for n in ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
        if f"{prefix}.{n}" in sd
    ]
    out = {n: sd.pop(f"{prefix}.{n}") for n in names}
    for n in ("weight_global_scale", "input_global_scale"):
        if n in out:
            out[n] = out[n].float().reshape(1)
    return out


def load_quantized(
    path: "str | os.PathLike", *, device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.bfloat16
) -> tuple[nn.Module, Any]:
    """Load a quantized checkpoint as a transformers model with FP4Linears -> (model, tokenizer or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    producer, config_dict, scheme, headers, prefixes = _describe(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}/config.json: cannot build a model config: {e}") from None
    config.quantization_config = None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_architecture(model)
    _validate(path, producer, scheme, headers, prefixes, model)

    sd = _load_tensors(_weight_files(path))
    for p in prefixes:
        lin = model.get_submodule(p)
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(
                f"{path}: {p} holds quantized tensors but is a {type(lin).__name__}, not a Linear"
            )
        fp4 = FP4Linear(lin.in_features, lin.out_features, scheme, bias=lin.bias is not None, dtype=dtype)
        fp4.load_state_dict(
            _module_tensors(producer, scheme, sd, p)
            | ({"bias": sd.pop(f"{p}.bias").to(dtype)} if f"{p}.bias" in sd else {}),
            strict=True,
        )
        parent, _, leaf = p.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, fp4)

    sd = {n: t.to(dtype) if t.is_floating_point() else t for n, t in sd.items()}
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: unexpected tensors {result.unexpected_keys[:10]}")
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and out_emb.weight.is_meta and getattr(config, "tie_word_embeddings", False):
        out_emb.weight = in_emb.weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensors {missing[:10]}" + (" ..." if len(missing) > 10 else "")
        )

    model.config.quantization_config = quantization_config(
        scheme,
        (config_dict.get("quantization_config") or {}).get("ignore") if producer != "modelopt" else None,
    )
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if (path / K_SHIFT_FILE).exists():
        try:
            load_k_shift(model, path / K_SHIFT_FILE)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if scheme.kv_quant:
        enable_kv4(model)
    model = model.to(device).eval()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


__all__ = [
    "CheckpointError",
    "checkpoint_info",
    "is_quantized_checkpoint",
    "load_quantized",
    "save_quantized",
    "uses_kv4",
]
