"""PTQ: schemes, FP4Linear, quantize_model on every tiny architecture, calibration, KV4."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_config, tiny_model
from transformers.cache_utils import DynamicCache

from fp4reason.formats import qdq_kv4, qdq_nvfp4
from fp4reason.quant import (
    SCHEMES,
    FP4Linear,
    KV4Cache,
    calibration_text,
    disable_kv4,
    get_scheme,
    quantization_config,
    quantize_model,
    uses_kv4,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def byte_tokenizer():
    """A real (fast) HF tokenizer whose ids are the 256 byte-level symbols, matching the tiny vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def dequant_f64(mod: FP4Linear) -> torch.Tensor:
    """Independent float64 decode of an FP4Linear's buffers."""
    table = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
    p = mod.weight_packed
    vals = torch.stack([table[(p & 0xF).long()], table[(p >> 4).long()]], -1).flatten(-2)
    if mod.scheme.weight_format == "nvfp4":
        scale = mod.weight_scale.double() / mod.weight_global_scale.double()
    else:
        scale = torch.pow(2.0, mod.weight_scale.double() - 127)
    return vals * scale.repeat_interleave(mod.scheme.block_size, dim=-1)


def ct_global_scale(amax: float) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam`` arithmetic: ``448 * 6 / amax`` on a float32 tensor."""
    return 448.0 * 6.0 / torch.tensor([amax], dtype=torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CALIB = [torch.arange(0, 256, 3), torch.arange(7, 200, 2)]


@pytest.fixture(params=sorted(SCHEMES))
def scheme(request) -> str:
    return request.param


# ------------------------------------------------------------------------------------------ schemes


def test_schemes_registry():
    assert set(SCHEMES) == {"nvfp4-w4a16", "nvfp4-w4a4", "nvfp4-w4a4kv4", "mxfp4-w4a16", "mxfp4-w4a4"}
    s = SCHEMES["nvfp4-w4a4kv4"]
    assert (s.weight_format, s.act_quant, s.kv_quant, s.block_size) == ("nvfp4", True, True, 16)
    assert SCHEMES["mxfp4-w4a4"].block_size == 32 and not SCHEMES["mxfp4-w4a16"].act_quant
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.act_quant = False
    assert get_scheme(s) is s
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        get_scheme("int4")


@pytest.mark.parametrize(
    "name,preset",
    [
        ("nvfp4-w4a16", "NVFP4A16"),
        ("nvfp4-w4a4", "NVFP4"),
        ("mxfp4-w4a16", "MXFP4A16"),
        ("mxfp4-w4a4", "MXFP4"),
    ],
)
def test_quantization_config_is_compressed_tensors_preset(name, preset):
    ct = pytest.importorskip("compressed_tensors.quantization")
    qc = ct.QuantizationConfig.model_validate(quantization_config(SCHEMES[name]))
    ours, ref = qc.config_groups["group_0"], ct.preset_name_to_scheme(preset, ["Linear"])
    fields = ("num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "scale_dtype")
    for a, b in ((ours.weights, ref.weights), (ours.input_activations, ref.input_activations)):
        assert (a is None) == (b is None)
        if a is not None:
            assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}
    assert qc.format == f"{SCHEMES[name].weight_format}-pack-quantized" and qc.ignore == ["lm_head"]


# ------------------------------------------------------------------------------------------ FP4Linear


@pytest.mark.parametrize("name", ["nvfp4-w4a16", "mxfp4-w4a16"])
def test_fp4linear_forward_matches_float64(name):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    mod = FP4Linear.from_linear(lin, name)
    assert (mod.in_features, mod.out_features, mod.scheme) == (64, 48, SCHEMES[name])
    w = dequant_f64(mod)
    assert rel_err(w, lin.weight) < 0.15  # 4-bit: a plausible error, not zero, not garbage
    torch.testing.assert_close(mod.weight_fp4.dequantize(torch.float32).double(), w, rtol=2.0**-23, atol=0)
    x = torch.randn(3, 5, 64)
    ref = x.double() @ w.T + lin.bias.double()
    torch.testing.assert_close(mod(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_fp4linear_buffers_and_dtype_moves():
    lin = nn.Linear(32, 16, bias=True)
    mod = FP4Linear.from_linear(lin, "nvfp4-w4a4", input_global_scale=torch.tensor(300.0))
    names = {n: (t.dtype, tuple(t.shape)) for n, t in mod.state_dict().items()}
    assert names == {
        "weight_packed": (torch.uint8, (16, 16)),
        "weight_scale": (torch.float8_e4m3fn, (16, 2)),
        "weight_global_scale": (torch.float32, (1,)),
        "input_global_scale": (torch.float32, (1,)),
        "bias": (torch.float32, (16,)),
    }
    before = {n: t.clone() for n, t in mod.state_dict().items() if n != "bias"}
    mod.to(torch.bfloat16)
    for n, t in before.items():
        got = getattr(mod, n)
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8)), n
    assert mod.bias.dtype == torch.bfloat16
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    ref = F.linear(qdq_nvfp4(x, torch.tensor([300.0])), mod.weight_fp4.dequantize(torch.bfloat16), mod.bias)
    assert torch.equal(mod(x), ref)
    mx = FP4Linear.from_linear(nn.Linear(64, 8), "mxfp4-w4a16")
    assert (
        set(mx.state_dict()) == {"weight_packed", "weight_scale", "bias"}
        and mx.weight_scale.dtype == torch.uint8
    )


def test_fp4linear_errors():
    with pytest.raises(ValueError, match="not divisible by the nvfp4 block size 16"):
        FP4Linear.from_linear(nn.Linear(40, 8), "nvfp4-w4a16")
    with pytest.raises(ValueError, match="not divisible by the mxfp4 block size 32"):
        FP4Linear.from_linear(nn.Linear(48, 8), "mxfp4-w4a16")
    with pytest.raises(ValueError, match="needs a calibrated input_global_scale"):
        FP4Linear.from_linear(nn.Linear(32, 8), "nvfp4-w4a4")
    with pytest.raises(ValueError, match="finite and > 0"):
        FP4Linear.from_linear(nn.Linear(32, 8), "nvfp4-w4a4", input_global_scale=torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="expects K=32"):
        FP4Linear.from_linear(nn.Linear(32, 8), "nvfp4-w4a16")(torch.randn(2, 16))


# ------------------------------------------------------------------------------------------ quantize_model


def test_quantize_model_every_arch_and_scheme(arch, scheme):
    ref = tiny_model(arch)
    model = quantize_model(copy.deepcopy(ref), scheme, CALIB, progress=False)
    s = SCHEMES[scheme]
    for i in range(2):
        layer = model.model.layers[i]
        for name in PROJ:
            mod = layer.get_submodule(
                ("self_attn." if "_proj" in name and name[0] in "qkvo" else "mlp.") + name
            )
            assert isinstance(mod, FP4Linear) and mod.scheme == s
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.config.quantization_config["format"] == s.ct_format
    assert uses_kv4(model) == s.kv_quant
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert 1e-3 < rel_err(a, b) < 0.5  # 4-bit on random weights: clearly perturbed, not broken


def test_fused_projections_share_scales(arch):
    ref = tiny_model(arch)
    model = quantize_model(copy.deepcopy(ref), "nvfp4-w4a4", CALIB, progress=False)
    for i in range(2):
        for parent, group in (
            ("self_attn", ("q_proj", "k_proj", "v_proj")),
            ("mlp", ("gate_proj", "up_proj")),
        ):
            orig = [ref.model.layers[i].get_submodule(f"{parent}.{n}").weight for n in group]
            mods = [model.model.layers[i].get_submodule(f"{parent}.{n}") for n in group]
            expected = ct_global_scale(max(w.abs().max().item() for w in orig))
            for m in mods:
                assert torch.equal(m.weight_global_scale, expected)
                assert torch.equal(m.input_global_scale, mods[0].input_global_scale)
        down = model.model.layers[i].mlp.down_proj  # alone: its own amax
        w = ref.model.layers[i].mlp.down_proj.weight
        assert torch.equal(down.weight_global_scale, ct_global_scale(w.abs().max().item()))


def test_a4_uses_calibrated_input_scale(arch):
    ref = tiny_model(arch)
    amax = {}

    def hook(name):
        return lambda m, args: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    for n, m in ref.named_modules():
        if n.endswith(PROJ):
            m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        for ids in CALIB:
            ref(ids[None], use_cache=False)
    model = quantize_model(tiny_model(arch), "nvfp4-w4a4", CALIB, progress=False)
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = max(amax[p + f"self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj"))
        gu = max(amax[p + f"mlp.{n}"] for n in ("gate_proj", "up_proj"))
        for name, a in (
            ("self_attn.q_proj", qkv),
            ("self_attn.o_proj", amax[p + "self_attn.o_proj"]),
            ("mlp.up_proj", gu),
            ("mlp.down_proj", amax[p + "mlp.down_proj"]),
        ):
            assert torch.equal(model.get_submodule(p + name).input_global_scale, ct_global_scale(a)), name
    # the forward quantizes its input with that static scale, not a dynamic one
    mod = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128) * 5.0
    w = mod.weight_fp4.dequantize(torch.float32)
    assert torch.equal(mod(x), F.linear(qdq_nvfp4(x, mod.input_global_scale), w))
    assert not torch.equal(mod(x), F.linear(qdq_nvfp4(x), w))


def test_a4_activation_quant_matches_compressed_tensors():
    """Our A4 input quantization equals compressed-tensors' own fake quantizer (float32 input)."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    mod = FP4Linear.from_linear(
        nn.Linear(64, 16), "nvfp4-w4a4", input_global_scale=torch.tensor(2688.0 / 3.0)
    )
    args = ct.preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    holder = nn.Module()
    holder.input_global_scale = nn.Parameter(mod.input_global_scale.clone(), requires_grad=False)
    holder.quantization_status = ct.QuantizationStatus.FROZEN
    x = torch.randn(4, 9, 64) * torch.tensor([0.01, 1.0, 3.0, 10.0])[:, None, None]
    assert torch.equal(qdq_nvfp4(x, mod.input_global_scale), forward_quantize(holder, x, "input", args))


def test_builtin_calibration_text():
    text = calibration_text()
    assert len(text.encode()) > 15_000 and "Solution." in text
    tok = byte_tokenizer()
    model = tiny_model("qwen2")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    # layer 0's q/k/v input is RMSNorm(embedding): per token, so its amax over the text is cheap to get
    with torch.no_grad():
        amax = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).abs().max().item()
    quantize_model(model, "nvfp4-w4a4", tokenizer=tok, progress=False)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.input_global_scale, ct_global_scale(amax))
    # strings as calib_data go through the tokenizer too
    short = [text[:700], text[-900:]]
    d = quantize_model(tiny_model("qwen2"), "nvfp4-w4a4", short, tokenizer=tok, progress=False)
    ids = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in short]
    e = quantize_model(tiny_model("qwen2"), "nvfp4-w4a4", ids, progress=False)
    key = "model.layers.1.mlp.down_proj.input_global_scale"
    assert torch.equal(d.state_dict()[key], e.state_dict()[key])
    assert not torch.equal(d.state_dict()[key], model.state_dict()[key])


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_model(tiny_model("llama"), "nvfp4-w8a8")
    with pytest.raises(ValueError, match="pass a tokenizer"):
        quantize_model(tiny_model("llama"), "nvfp4-w4a4")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        quantize_model(tiny_model("llama"), "nvfp4-w4a4", ["some text"])
    with pytest.raises(ValueError, match="1-D"):
        quantize_model(tiny_model("llama"), "nvfp4-w4a4", [torch.zeros(2, 3, 4, dtype=torch.long)])
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        quantize_model(gpt2, "nvfp4-w4a16")
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.head_dim = 48, 12  # K=48: fine for NVFP4 (16), not MXFP4 (32)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"in_features K=48 is not divisible by the mxfp4 block size 32"):
        quantize_model(copy.deepcopy(model), "mxfp4-w4a16")
    quantize_model(model, "nvfp4-w4a16", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "nvfp4-w4a16")


# ------------------------------------------------------------------------------------------ KV4


def test_kv4_changes_logits_only_through_the_cache(arch):
    w4a4 = quantize_model(tiny_model(arch), "nvfp4-w4a4", CALIB, progress=False)
    kv4 = quantize_model(tiny_model(arch), "nvfp4-w4a4kv4", CALIB, progress=False)
    sa, sb = w4a4.state_dict(), kv4.state_dict()
    assert all(
        torch.equal(
            sa[k].view(torch.uint8) if sa[k].dtype == torch.float8_e4m3fn else sa[k],
            sb[k].view(torch.uint8) if sb[k].dtype == torch.float8_e4m3fn else sb[k],
        )
        for k in sa
    )
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        la, lb = w4a4(ids).logits, kv4(ids).logits
        lc = kv4(ids, use_cache=False).logits  # no cache requested: K/V are quantized all the same
    assert not torch.allclose(la, lb, atol=1e-4) and 1e-4 < rel_err(lb, la) < 0.3
    assert torch.equal(lb, lc)
    disable_kv4(kv4)
    assert not uses_kv4(kv4)
    with torch.no_grad():
        assert torch.equal(kv4(ids).logits, la)


def test_kv4_cache_holds_quantized_new_states_per_call(arch):
    """Layer 0's cache = qdq_kv4 of each call's raw keys/values (prefill, then one decode step)."""
    model = quantize_model(tiny_model(arch), "nvfp4-w4a4kv4", CALIB, progress=False)
    prompt, nxt = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 1))
    raw = DynamicCache(config=model.config)  # same model without KV4: unquantized states of layer 0
    disable_kv4(model)
    with torch.no_grad():
        model(prompt, past_key_values=raw)
        raw_k1, raw_v1 = raw.layers[0].keys.clone(), raw.layers[0].values.clone()
        model(nxt, past_key_values=raw)
        raw_k2, raw_v2 = raw.layers[0].keys[:, :, -1:], raw.layers[0].values[:, :, -1:]
    from fp4reason.quant import enable_kv4

    enable_kv4(model)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, KV4Cache)
        model(nxt, past_key_values=cache)
    k, v = cache.layers[0].keys, cache.layers[0].values
    assert torch.equal(k, torch.cat([qdq_kv4(raw_k1), qdq_kv4(raw_k2)], dim=2))
    assert torch.equal(v, torch.cat([qdq_kv4(raw_v1), qdq_kv4(raw_v2)], dim=2))
    assert not torch.equal(k[:, :, :12], raw_k1)


def test_kv4_generate_equals_stepwise_cached_forward():
    model = quantize_model(tiny_model("qwen3"), "nvfp4-w4a4kv4", CALIB, progress=False)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mask = torch.ones_like(prompt)
        gen = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache, ids, tok = KV4Cache(config=model.config), prompt, prompt
        for _ in range(6):
            logits = model(tok, past_key_values=cache).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, tok], dim=1)
    assert torch.equal(gen, ids)
    assert cache.get_seq_length() == 15


def test_kv4_rejects_a_filled_plain_cache():
    model = quantize_model(tiny_model("llama"), "nvfp4-w4a4kv4", CALIB, progress=False)
    cache = DynamicCache(config=model.config)
    disable_kv4(model)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)), past_key_values=cache)
    from fp4reason.quant import enable_kv4

    enable_kv4(model)
    with pytest.raises(ValueError, match="needs a KV4Cache"):
        model(torch.randint(0, 256, (1, 1)), past_key_values=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["nvfp4-w4a16", "nvfp4-w4a4", "mxfp4-w4a16"])
def test_quantized_model_on_cuda_matches_cpu(scheme):
    model = quantize_model(tiny_model("qwen3", dtype=torch.bfloat16), scheme, CALIB, progress=False)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cpu = model(ids).logits.float()
        gpu = model.to("cuda")(ids.cuda()).logits.float().cpu()
    scale = model.model.layers[0].mlp.down_proj.weight_scale
    assert scale.is_cuda and scale.dtype == (torch.uint8 if scheme.startswith("mx") else torch.float8_e4m3fn)
    assert rel_err(gpu, cpu) < 0.02
