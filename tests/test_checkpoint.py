"""Checkpoints: save/load round trips, interop with compressed-tensors (both directions), a hand-built
ModelOpt NVFP4 fixture, shards, atomic writes, clear errors on bad files, and the quantize/info commands."""

import argparse
import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_quant import CALIB, E2M1, byte_tokenizer

from fp4reason.formats import quantize_nvfp4
from fp4reason.quant import (
    SCHEMES,
    CheckpointError,
    FP4Linear,
    checkpoint_info,
    is_quantized_checkpoint,
    load_quantized,
    quantization_config,
    quantize_model,
    save_quantized,
    uses_kv4,
)

IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def quantized(arch="llama", scheme="nvfp4-w4a4", dtype=torch.float32, **cfg):
    model = tiny_model(arch, dtype=dtype)
    for k, v in cfg.items():
        setattr(model.config, k, v)
    return quantize_model(model, scheme, CALIB, progress=False)


def fp4_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FP4Linear)}


# ------------------------------------------------------------------------------------------ round trips


ROUND_TRIPS = [("llama", s) for s in sorted(SCHEMES)] + [("qwen2", "nvfp4-w4a4kv4"), ("qwen3", "mxfp4-w4a4")]


@pytest.mark.parametrize("arch,scheme", ROUND_TRIPS)
def test_save_load_identical_logits(tmp_path, arch, scheme):
    model = quantized(arch, scheme)
    out = save_quantized(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
    assert is_quantized_checkpoint(out)
    loaded, tok = load_quantized(out, dtype=torch.float32)
    assert tok is None and uses_kv4(loaded) == SCHEMES[scheme].kv_quant
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(raw(sa[k]), raw(sb[k])) for k in sa)
    assert torch.equal(logits(model), logits(loaded))
    info = checkpoint_info(out)
    assert (info["scheme"], info["producer"], info["quantized_layers"]) == (scheme, "compressed-tensors", 14)
    assert info["architecture"] == arch and info["file_bytes"] == (out / "model.safetensors").stat().st_size


def test_bf16_tied_embeddings_tokenizer_and_overwrite(tmp_path):
    model = quantized("qwen3", "nvfp4-w4a4kv4", dtype=torch.bfloat16, tie_word_embeddings=True)
    model.tie_weights()
    tok = byte_tokenizer()
    out = save_quantized(model, tmp_path / "ckpt", tok)
    out = save_quantized(model, tmp_path / "ckpt", tok)  # overwriting an existing checkpoint is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once
        assert f.metadata()["format"] == "pt"
    loaded, tok2 = load_quantized(out)  # default dtype bf16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert tok2 is not None and tok2("2+2=4")["input_ids"] == tok("2+2=4")["input_ids"]
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(model), logits(loaded))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "nvfp4-pack-quantized" and cfg["fp4reason_scheme"] == "nvfp4-w4a4kv4"


def test_sharded_checkpoint(tmp_path):
    model = quantized("qwen2", "mxfp4-w4a4")
    out = save_quantized(model, tmp_path / "ckpt")
    sd = load_file(out / "model.safetensors")
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, out / fname, metadata={"format": "pt"})
    (out / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded, _ = load_quantized(out, dtype=torch.float32)
    assert torch.equal(logits(model), logits(loaded))
    assert len(checkpoint_info(out)["files"]) == 2


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import fp4reason.quant.checkpoint as ckpt

    model = quantized("llama", "nvfp4-w4a16")
    good = save_quantized(model, tmp_path / "ckpt")
    before = (good / "model.safetensors").read_bytes()

    def boom(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "ckpt")
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (good / "model.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------------------- compressed-tensors


def test_compressed_tensors_reads_our_files(tmp_path):
    """transformers + compressed-tensors load our file: same tensors, same decompressed weights, and for
    W4A16 the same logits from their own dequantizing forward."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    for scheme, preset in (("nvfp4-w4a4", "NVFP4"), ("nvfp4-w4a16", "NVFP4A16"), ("mxfp4-w4a16", "MXFP4A16")):
        ours = quantized("qwen2", scheme, dtype=torch.bfloat16)
        out = save_quantized(ours, tmp_path / scheme)
        compressor = NVFP4PackedCompressor if scheme.startswith("nv") else MXFP4PackedCompressor
        ct_scheme = preset_name_to_scheme(preset, ["Linear"])
        for name, mod in fp4_modules(ours).items():
            sd = {k: v for k, v in mod.state_dict().items() if k != "bias"}
            dense = compressor.decompress(sd, ct_scheme)["weight"]
            assert torch.equal(dense, mod.weight_fp4.dequantize(torch.bfloat16)), name
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        for name, mod in fp4_modules(ours).items():
            ct_mod = theirs.get_submodule(name)
            for k, v in mod.state_dict().items():
                if k != "bias":
                    assert torch.equal(raw(getattr(ct_mod, k).data), raw(v)), f"{name}.{k}"
        if not SCHEMES[scheme].act_quant:  # CT's A4 simulation rounds activation scales in bf16
            assert torch.equal(logits(theirs), logits(ours))


def _ct_write(model, preset: str, out: Path) -> Path:
    """Quantize and save with compressed-tensors' own lifecycle (what llm-compressor does)."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    qc = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"]
    )
    apply_quantization_config(model, qc)
    group = 16 if preset.startswith("NV") else 32
    for mod in model.modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        w, g = mod.weight.data, None
        if hasattr(mod, "weight_global_scale"):
            g = generate_gparam(w.min(), w.max())
            mod.weight_global_scale.data.copy_(g)
        b = w.unflatten(-1, (-1, group))
        s, _ = calculate_qparams(b.amin(-1), b.amax(-1), mod.quantization_scheme.weights, global_scale=g)
        mod.weight_scale.data.copy_(s.to(mod.weight_scale.dtype))
        if hasattr(mod, "input_global_scale"):
            mod.input_global_scale.data.fill_(123.0)
    compressor = ModelCompressor.from_pretrained_model(
        model, f"{'nv' if group == 16 else 'mx'}fp4-pack-quantized"
    )
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    return out


@pytest.mark.parametrize("preset,scheme", [("NVFP4", "nvfp4-w4a4"), ("MXFP4A16", "mxfp4-w4a16")])
def test_we_load_compressed_tensors_checkpoints(tmp_path, preset, scheme):
    pytest.importorskip("compressed_tensors")
    ref = tiny_model("llama")
    out = _ct_write(copy.deepcopy(ref), preset, tmp_path / "ct")
    info = checkpoint_info(out)
    assert (info["scheme"], info["producer"], info["quantized_layers"]) == (scheme, "compressed-tensors", 14)
    model, _ = load_quantized(out, dtype=torch.float32)
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, mod in fp4_modules(model).items():
            assert torch.equal(mod.weight_packed, f.get_tensor(f"{name}.weight_packed"))
            assert torch.equal(raw(mod.weight_scale), raw(f.get_tensor(f"{name}.weight_scale")))
            # CT's per-module recipe on float32 weights = ours with the module's own tensor scale
            if scheme.startswith("nv"):
                assert torch.equal(mod.input_global_scale, torch.tensor([123.0]))
                assert torch.equal(mod.weight_packed, quantize_nvfp4(ref.get_submodule(name).weight).packed)
    rel = ((logits(model) - logits(ref)).norm() / logits(ref).norm()).item()
    assert 1e-3 < rel < 0.5


def test_info_command_on_compressed_tensors_checkpoint(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from fp4reason.commands import info

    out = _ct_write(tiny_model("qwen3"), "NVFP4A16", tmp_path / "ct")
    parser = argparse.ArgumentParser()
    info.register(parser.add_subparsers())
    args = parser.parse_args(["info", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "nvfp4-w4a16" in text and "compressed-tensors" in text and "FP4 layers" in text and "14" in text
    args = parser.parse_args(["info", str(out), "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantized_params"] == sum(
        m.in_features * m.out_features
        for n, m in tiny_model("qwen3").named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    )
    assert data["compression_ratio"] > 1


def test_quantize_command(tmp_path, monkeypatch, capsys):
    import fp4reason.models
    from fp4reason.commands import quantize

    monkeypatch.setattr(
        fp4reason.models,
        "load_model",
        lambda name, dtype, device: (tiny_model("qwen2", dtype=dtype), byte_tokenizer()),
    )
    calib = tmp_path / "calib.txt"
    calib.write_text("The sum 1 + 2 + 3 = 6. " * 40)
    parser = argparse.ArgumentParser()
    quantize.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "quantize",
            "tiny",
            "--scheme",
            "nvfp4-w4a4",
            "--out",
            str(tmp_path / "q"),
            "--calib-file",
            str(calib),
        ]
    )
    assert args.func(args) == 0
    assert "nvfp4-w4a4" in capsys.readouterr().out
    model, tok = load_quantized(tmp_path / "q")
    assert tok is not None and len(fp4_modules(model)) == 14
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "tiny", "--scheme", "int3", "--out", "x"])
    args = parser.parse_args(
        ["quantize", "tiny", "--out", str(tmp_path / "r"), "--calib-file", "/nonexistent.txt"]
    )
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        args.func(args)


# ------------------------------------------------------------------------------------------ ModelOpt


def _modelopt_fixture(ref: nn.Module, out: Path, algo: str = "NVFP4") -> dict:
    """A ModelOpt unified-HF-export NVFP4 checkpoint (layout from nvfp4_kernels.md section 2.2): per Linear
    ``weight`` uint8 [N, K/2], ``weight_scale`` e4m3 [N, K/16], ``weight_scale_2`` f32 scalar = amax/2688,
    ``input_scale`` f32 scalar = amax_x/2688 (NVFP4 only); lm_head/embeddings/norms unquantized;
    ``hf_quant_config.json`` names the algorithm."""
    out.mkdir()
    ref.config.save_pretrained(out)
    sd, tensors = {}, {}
    for name, t in ref.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and ".layers." in name and t.ndim == 2:
            q = quantize_nvfp4(t)
            sd[f"{prefix}.weight"] = q.packed
            sd[f"{prefix}.weight_scale"] = q.block_scale
            sd[f"{prefix}.weight_scale_2"] = (t.abs().max() / 2688.0).reshape(())
            if algo == "NVFP4":
                sd[f"{prefix}.input_scale"] = torch.tensor(0.5 / 2688.0)
            tensors[prefix] = sd
        else:
            sd[name] = t
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    hf = {
        "producer": {"name": "modelopt", "version": "0.35.0"},
        "quantization": {
            "quant_algo": algo,
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": ["lm_head"],
        },
    }
    (out / "hf_quant_config.json").write_text(json.dumps(hf))
    return sd


@pytest.mark.parametrize("algo", ["NVFP4", "W4A16_NVFP4"])
def test_modelopt_checkpoint(tmp_path, algo):
    ref = tiny_model("qwen2")
    sd = _modelopt_fixture(ref, tmp_path / "mo", algo)
    assert is_quantized_checkpoint(tmp_path / "mo")
    info = checkpoint_info(tmp_path / "mo")
    assert info["producer"] == "modelopt" and info["quantized_layers"] == 14
    assert info["scheme"] == ("nvfp4-w4a4" if algo == "NVFP4" else "nvfp4-w4a16")
    model, _ = load_quantized(tmp_path / "mo", dtype=torch.float32)
    table = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
    for name, mod in fp4_modules(model).items():
        p = sd[f"{name}.weight"]
        nib = torch.stack([table[(p & 0xF).long()], table[(p >> 4).long()]], -1).flatten(-2)
        # ModelOpt's own dequant, in float64: nibble * weight_scale * weight_scale_2 (a multiplier)
        ref_w = (
            nib
            * sd[f"{name}.weight_scale"].double().repeat_interleave(16, -1)
            * sd[f"{name}.weight_scale_2"].double()
        )
        torch.testing.assert_close(
            mod.weight_fp4.dequantize(torch.float32).double(), ref_w, rtol=3e-7, atol=0
        )
        if algo == "NVFP4":
            assert torch.allclose(mod.input_global_scale, torch.tensor([2688.0 / 0.5]), rtol=1e-6)
    rel = ((logits(model) - logits(ref)).norm() / logits(ref).norm()).item()
    assert 1e-3 < rel < 0.5


def test_modelopt_unsupported(tmp_path):
    _modelopt_fixture(tiny_model("llama"), tmp_path / "mo", "FP8")
    assert not is_quantized_checkpoint(tmp_path / "mo")
    with pytest.raises(CheckpointError, match="quant_algo 'FP8' is not supported"):
        load_quantized(tmp_path / "mo")


# ------------------------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    return save_quantized(quantized("llama", "nvfp4-w4a4"), tmp_path_factory.mktemp("good") / "ckpt")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(path: Path, fn) -> None:
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda p: (p / "config.json").unlink(), "missing config.json"),
        (lambda p: (p / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"), "reads safetensors only"),
        (
            lambda p: os.truncate(p / "model.safetensors", (p / "model.safetensors").stat().st_size - 100),
            "truncated or corrupt",
        ),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 7), "truncated or corrupt"),
        (
            lambda p: _rewrite(
                p, lambda sd: sd.__setitem__(f"{Q}.weight_scale", sd[f"{Q}.weight_scale"].float())
            ),
            rf"{Q}.weight_scale: dtype F32, expected F8_E4M3",
        ),
        (
            lambda p: _rewrite(
                p,
                lambda sd: sd.__setitem__(
                    f"{Q}.weight_packed", sd[f"{Q}.weight_packed"][:, :-1].contiguous()
                ),
            ),
            rf"{Q}.weight_packed: shape \[64, 31\], expected \[64, 32\]",
        ),
        (
            lambda p: _rewrite(p, lambda sd: sd.pop(f"{Q}.input_global_scale")),
            rf"{Q}.input_global_scale: missing",
        ),
        (
            lambda p: _rewrite(p, lambda sd: sd.pop("model.norm.weight")),
            r"missing tensors \['model.norm.weight'\]",
        ),
        (
            lambda p: _rewrite(p, lambda sd: sd.__setitem__("model.extra", torch.zeros(2))),
            "unexpected tensors",
        ),
        (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_bad_checkpoints_raise_clear_errors(tmp_path, good_ckpt, corrupt, match):
    ckpt = _copy(good_ckpt, tmp_path / "bad")
    corrupt(ckpt)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(ckpt)
    if (
        "config" not in match
        and "JSON" not in match
        and "missing tensors" not in match
        and "unexpected" not in match
    ):
        with pytest.raises(CheckpointError, match=match):
            checkpoint_info(ckpt)


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_bad_configs(tmp_path, good_ckpt):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_quantized(tmp_path / "nope")
    assert not is_quantized_checkpoint(tmp_path / "nope")
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    assert not is_quantized_checkpoint(plain)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized(plain)
    fmt = _copy(good_ckpt, tmp_path / "fmt")
    _edit_config(
        fmt,
        lambda c: (
            c["quantization_config"].update(format="int-quantized", fp4reason_scheme=None)
            or c["quantization_config"]["config_groups"]["group_0"].update(format="int-quantized")
        ),
    )
    with pytest.raises(CheckpointError, match="unsupported compressed-tensors format 'int-quantized'"):
        load_quantized(fmt)
    arch = _copy(good_ckpt, tmp_path / "arch")
    _edit_config(arch, lambda c: c.update(model_type="no_such_arch"))
    with pytest.raises(CheckpointError, match="cannot build a model config"):
        load_quantized(arch)
    with pytest.raises(ValueError, match="needs a model quantized"):
        save_quantized(tiny_model("llama"), tmp_path / "x")


def test_unsupported_architecture_in_checkpoint(tmp_path):
    from transformers import GPT2Config

    ckpt = tmp_path / "gpt2"
    ckpt.mkdir()
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    cfg.quantization_config = {**quantized().config.quantization_config}
    cfg.save_pretrained(ckpt)
    lin = nn.Linear(32, 32)
    q = FP4Linear.from_linear(lin, "nvfp4-w4a16")
    save_file(
        {f"transformer.h.0.attn.c_proj.{k}": v for k, v in q.state_dict().items()}, ckpt / "model.safetensors"
    )
    cfg_json = json.loads((ckpt / "config.json").read_text())
    cfg_json["quantization_config"]["fp4reason_scheme"] = "nvfp4-w4a16"
    (ckpt / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_quantized(ckpt)


def test_mxfp4_scale_shape_mismatch(tmp_path):
    model = quantized("llama", "mxfp4-w4a16")
    out = save_quantized(model, tmp_path / "mx")
    _rewrite(out, lambda sd: sd.__setitem__(f"{Q}.weight_scale", sd[f"{Q}.weight_scale"][:, :1].contiguous()))
    with pytest.raises(CheckpointError, match=rf"{Q}.weight_scale: shape \[64, 1\], expected \[64, 2\]"):
        load_quantized(out)


def test_k_not_divisible_by_block(tmp_path):
    """A model whose hidden size (K=40) is not a multiple of 16 cannot hold NVFP4 layers: named error."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.head_dim = 40, 10
    model = AutoModelForCausalLM.from_config(cfg)
    sd = dict(model.state_dict())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            n, k = mod.out_features, mod.in_features
            del sd[f"{name}.weight"]
            sd[f"{name}.weight_packed"] = torch.zeros(n, k // 2, dtype=torch.uint8)
            sd[f"{name}.weight_scale"] = torch.zeros(n, k // 16, dtype=torch.float8_e4m3fn)
            sd[f"{name}.weight_global_scale"] = torch.ones(1)
    out = tmp_path / "k40"
    out.mkdir()
    cfg.quantization_config = quantization_config(SCHEMES["nvfp4-w4a16"])
    cfg.save_pretrained(out)
    save_file(sd, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{Q}: K=40 is not divisible by the nvfp4 block size 16"):
        load_quantized(out)
