"""Q-FIT key shifts at inference: KV4Cache, engine, checkpoints, the qfit -> quantize -> generate CLI flow."""

import copy
import json
import shutil

import pytest
import torch
from conftest import tiny_model, tiny_model_dir

import fp4reason.quant.kv4 as kv4_module
from fp4reason.quant import CheckpointError, checkpoint_info, load_quantized, quantize_model, save_quantized
from fp4reason.quant.kshift import K_SHIFT_FILE, attention_modules, k_shifts, set_k_shift
from fp4reason.quant.kv4 import KV4Cache, enable_kv4


def _kv4_64(x: torch.Tensor) -> torch.Tensor:
    """KV4 (E1M2 grid 0..3.5 step 0.5, E4M3 scale per 16 channels, tensor scale amax/(3.5*448)) in float64."""
    b = x.double().unflatten(-1, (-1, 16))
    g = b.abs().max() / (3.5 * 448)
    s = (b.abs().amax(-1, keepdim=True) / (3.5 * g)).clamp(max=448).to(torch.float8_e4m3fn).double() * g
    q = torch.where(s > 0, torch.round((b / torch.where(s > 0, s, 1)).clamp(-3.5, 3.5) * 2) / 2, 0.0)
    return (q * s).flatten(-2)


def _shifts(seed: int, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(1, 2, 1, 16, generator=g) for _ in range(2)]


def _with_shifts(model, shifts):
    for a, s in zip(attention_modules(model), shifts, strict=True):
        set_k_shift(a, s)
    return model


def _ids(seed: int, n: int = 1, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_kv4_cache_subtracts_shift_before_quantizing():
    shift = _shifts(0)[0]
    cache = KV4Cache(k_shift=[shift, None])
    g = torch.Generator().manual_seed(1)
    k, v, k2 = (torch.randn(2, 2, n, 16, generator=g) + 2 for n in (9, 9, 1))
    keys, values = cache.update(k, v, 0)
    torch.testing.assert_close(keys.double(), _kv4_64(k.double() - shift.double()), atol=1e-6, rtol=0)
    torch.testing.assert_close(values.double(), _kv4_64(v), atol=1e-6, rtol=0)
    keys1, _ = cache.update(k, v, 1)  # a layer without a shift
    torch.testing.assert_close(keys1.double(), _kv4_64(k), atol=1e-6, rtol=0)
    keys, _ = cache.update(k2, k2, 0)  # a decode step: its own tensor scale, the same shift
    torch.testing.assert_close(
        keys[:, :, -1:].double(), _kv4_64(k2.double() - shift.double()), atol=1e-6, rtol=0
    )
    assert not torch.allclose(keys[:, :, :9], _kv4_64(k).float(), atol=1e-3)  # the shift did act


def test_shift_cancels_in_softmax(arch, monkeypatch):
    """Keys minus a large per-head shift, no quantization: logits and greedy decoding are unchanged."""
    ids = _ids(2)
    plain = tiny_model(arch)
    ref = plain(ids).logits
    ref_gen = plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    monkeypatch.setattr(kv4_module, "qdq_kv4", lambda x: x)
    m = enable_kv4(_with_shifts(tiny_model(arch), _shifts(3, scale=20.0)))
    cache = KV4Cache()
    torch.testing.assert_close(m(ids, past_key_values=cache).logits, ref, atol=2e-5, rtol=0)
    assert cache.k_shift is not None and cache.layers[0].keys.abs().mean() > 5  # keys really were shifted
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), ref_gen)


def test_hf_kv4_equals_fakequant_training_attention(arch):
    from fp4reason.train.fakequant import prepare_qat

    ids = _ids(4, n=2)
    shifts = [s + 1.0 for s in _shifts(5)]
    base = tiny_model(arch)
    infer = enable_kv4(_with_shifts(copy.deepcopy(base), shifts))
    train = prepare_qat(_with_shifts(copy.deepcopy(base), shifts), weights=False)
    y = infer(ids).logits
    torch.testing.assert_close(y, train(ids).logits, atol=1e-6, rtol=0)
    unshifted = enable_kv4(copy.deepcopy(base))(ids).logits
    assert (y - unshifted).abs().max() > 1e-3  # the shift changes the KV4 error, so it must be applied


def _quantized(arch: str = "qwen2", shifts=None):
    m = tiny_model(arch)
    if shifts is not None:
        _with_shifts(m, shifts)
    return quantize_model(m, "nvfp4-w4a4kv4", [torch.arange(200) % 256], progress=False)


def test_engine_kv4_applies_shift():
    from fp4reason.engine import Engine

    model = _quantized("qwen3", _shifts(6, scale=10.0))
    prompt = _ids(7, t=9)
    hf = model.generate(
        prompt,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    engine = Engine(model, None, max_batch_size=1, max_seq_len=64)
    (gen,) = engine.generate(prompt.tolist(), max_new_tokens=8, return_entropies=True)
    assert gen.token_ids == hf.sequences[0, 9:].tolist()
    logp = torch.log_softmax(torch.cat(hf.logits).double(), -1)
    torch.testing.assert_close(
        torch.tensor(gen.entropies, dtype=torch.float64), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5
    )
    for layer in engine.decoder.layers:
        layer.k_shift = None
    (free,) = engine.generate(prompt.tolist(), max_new_tokens=8, return_entropies=True)
    assert max(abs(a - b) for a, b in zip(free.entropies, gen.entropies, strict=True)) > 1e-3


def test_checkpoint_round_trip_keeps_shifts(tmp_path):
    shifts = _shifts(8)
    model = _quantized("llama", shifts)
    ids = _ids(9)
    y = model(ids).logits
    out = save_quantized(model, tmp_path / "ckpt")
    assert (out / K_SHIFT_FILE).is_file() and checkpoint_info(out)["k_shift_layers"] == 2
    loaded, _ = load_quantized(out, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(k_shifts(loaded), shifts, strict=True))
    assert torch.equal(loaded(ids).logits, y)
    plain = save_quantized(_quantized("llama"), tmp_path / "plain")
    assert not (plain / K_SHIFT_FILE).exists() and checkpoint_info(plain)["k_shift_layers"] == 0
    assert k_shifts(load_quantized(plain, dtype=torch.float32)[0]) is None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_quantized(_quantized("qwen2", _shifts(10)), tmp_path_factory.mktemp("k") / "ckpt")


def _key(i: int) -> str:
    return f"model.layers.{i}.self_attn.k_shift"


BAD = {
    "wrong shape": ({_key(0): torch.zeros(1, 4, 1, 16), _key(1): torch.zeros(1, 2, 1, 16)}, "shape"),
    "layer out of range": ({_key(i): torch.zeros(1, 2, 1, 16) for i in (0, 1, 7)}, r"layers \[.*7\]"),
    "missing layer": ({_key(0): torch.zeros(1, 2, 1, 16)}, r"\[1\]|each of 2"),
    "bad key": ({"model.layers.0.k_shift": torch.zeros(1, 2, 1, 16)}, "unexpected key"),
    "not finite": (
        {_key(0): torch.full((1, 2, 1, 16), float("nan")), _key(1): torch.zeros(1, 2, 1, 16)},
        "finite",
    ),
    "truncated": (None, "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_k_shift_file_is_a_clear_error(ckpt, tmp_path, case):
    from safetensors.torch import save_file

    state, match = BAD[case]
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    if state is None:
        data = (bad / K_SHIFT_FILE).read_bytes()
        (bad / K_SHIFT_FILE).write_bytes(data[: len(data) // 2])
    else:
        save_file(state, bad / K_SHIFT_FILE)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(bad, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=match):
        checkpoint_info(bad)


def test_cli_qfit_quantize_generate(tmp_path, capsys):
    """`fp4reason qfit DIR --out Q`, `quantize Q --scheme nvfp4-w4a4kv4 --out C`, `info C`, `generate C`."""
    from safetensors.torch import load_file

    from fp4reason.cli import main
    from fp4reason.models import load_model

    src, q, c = tiny_model_dir(tmp_path / "src"), tmp_path / "qfit", tmp_path / "ckpt"
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. 12 + 30 = 42. " * 30)
    qfit_args = [
        "--out",
        str(q),
        "--calib-file",
        str(calib),
        "--samples",
        "2",
        "--seq-len",
        "64",
        "--grid",
        "3",
    ]
    assert main(["qfit", str(src), *qfit_args]) == 0
    assert (
        main(["quantize", str(q), "--scheme", "nvfp4-w4a4kv4", "--out", str(c), "--calib-file", str(calib)])
        == 0
    )
    assert "kept Q-FIT key shifts for 2 layers" in capsys.readouterr().out
    written, kept = load_file(q / K_SHIFT_FILE), load_file(c / K_SHIFT_FILE)
    assert written.keys() == kept.keys() and all(torch.equal(written[k], kept[k]) for k in written)
    assert any(t.abs().sum() > 0 for t in kept.values())
    assert main(["info", str(c), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["k_shift_layers"] == 2
    model, _ = load_model(c, dtype=torch.float32)
    assert all(torch.equal(a.k_shift, kept[_key(i)]) for i, a in enumerate(attention_modules(model)))
    gen = [
        "generate",
        str(c),
        "--prompt",
        "Hi",
        "--sampler",
        "greedy",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    ]
    assert main(gen) == 0
    assert main(["qfit", str(src), "--model", str(src), *qfit_args]) != 0
    assert "give the model once" in capsys.readouterr().err


def test_load_model_attaches_shifts_of_a_plain_qfit_dir(tmp_path, monkeypatch):
    """A Q-FIT'ed BF16 directory (what ``fp4reason qfit`` writes) loads with its shifts, so a later in-memory
    KV4 scheme uses them; the same directory without the file loads without shifts."""
    import transformers

    from fp4reason.models import load_model
    from fp4reason.quant import save_k_shift

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: "tokenizer")
    shifts = _shifts(21)
    model = _with_shifts(tiny_model("qwen2"), shifts)
    for name in ("plain", "qfit"):
        model.save_pretrained(tmp_path / name)
    save_k_shift(model, tmp_path / "qfit" / K_SHIFT_FILE)
    loaded, tok = load_model(tmp_path / "qfit", dtype=torch.float32)
    assert tok == "tokenizer" and all(
        torch.equal(a, b) for a, b in zip(k_shifts(loaded), shifts, strict=True)
    )
    assert k_shifts(load_model(tmp_path / "plain", dtype=torch.float32)[0]) is None
