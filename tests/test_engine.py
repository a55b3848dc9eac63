"""The engine against Hugging Face ``generate`` on tiny random models (float32, CPU; GPU tests marked)."""

import copy

import pytest
import torch
from conftest import tiny_config, tiny_model

from fp4reason.engine import Engine
from fp4reason.engine.engine import check_finite_steps
from fp4reason.sampling import SamplerConfig

GREEDY = SamplerConfig(mode="greedy")


def _prompts(lengths=(5, 11, 2), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _hf(model, prompt: list[int], n: int, **kw):
    """Unbatched HF greedy run: (new token ids, raw logits per step [n, V])."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).double()


def _entropy64(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def _quantized(arch: str, scheme: str):
    from fp4reason.quant import quantize_model

    model = tiny_model(arch)
    return quantize_model(model, scheme, [torch.arange(200) % 256], progress=False)


@pytest.mark.parametrize("dtype,scheme", [("float32", None), ("bfloat16", None), ("float32", "nvfp4-w4a4")])
def test_greedy_batch_matches_unbatched_hf(arch, dtype, scheme):
    model = tiny_model(arch, dtype=getattr(torch, dtype)) if scheme is None else _quantized(arch, scheme)
    prompts = _prompts()
    ref = [_hf(model, p, 10)[0] for p in prompts]
    engine = Engine(model, None, max_batch_size=4, max_seq_len=64)
    gens = engine.generate(prompts, max_new_tokens=10)
    assert [g.token_ids for g in gens] == ref
    assert all(g.finish_reason == "length" for g in gens)
    assert len({tuple(r) for r in ref}) == len(ref)  # the rows really differ
    if scheme is None:  # fusing q/k/v and gate/up re-pointed the HF weights at views of the fused ones
        assert _hf(model, prompts[1], 10)[0] == ref[1]


def test_fp4_projections_are_fused():
    engine = Engine(_quantized("qwen3", "nvfp4-w4a16"), None, max_batch_size=1, max_seq_len=32)
    layer = engine.decoder.layers[0]
    assert (layer.qkv.kind, layer.gate_up.kind, layer.down.kind) == ("fp4", "fp4", "fp4")
    assert layer.qkv.weight.shape == (4 * 16 + 2 * 2 * 16, 64)
    dense = Engine(tiny_model("qwen2"), None, max_batch_size=1, max_seq_len=32).decoder.layers[0]
    assert dense.qkv.kind == "dense" and dense.qkv.bias is not None  # qwen2's q/k/v biases, fused too


def test_unfusable_fp4_group_runs_per_module():
    model = _quantized("llama", "nvfp4-w4a16")
    model.model.layers[1].self_attn.k_proj.weight_global_scale.mul_(2)  # k no longer shares q/v's scale
    prompts = _prompts((6, 3), seed=9)
    ref = [_hf(model, p, 8)[0] for p in prompts]
    engine = Engine(model, None, max_batch_size=2, max_seq_len=32)
    assert [layer.qkv.kind for layer in engine.decoder.layers] == ["fp4", "parts"]
    assert [g.token_ids for g in engine.generate(prompts, max_new_tokens=8)] == ref


def test_w4a4_input_quantization_folds_into_norms(monkeypatch):
    """``Ops.fold_act`` (on with torch.compile on the GPU): the norm and silu*mul before a W4A4 projection
    quantize its input in their own kernel; bit-identical to quantizing in the projection, never twice."""
    import fp4reason.engine.model as m

    model = _quantized("qwen3", "nvfp4-w4a4")
    prompts = _prompts((6, 3), seed=5)
    calls: dict[str, int] = {}

    def counting(name, fn):
        def wrapped(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(m, "qdq_nvfp4", counting("qdq", m.qdq_nvfp4))
    runs = []
    for fold in (False, True):
        engine = Engine(model, None, max_batch_size=2, max_seq_len=32)
        engine.decoder.ops = ops = m.Ops(fold_act=fold)
        ops.norm_act, ops.silu_mul_act = counting("norm", ops.norm_act), counting("silu", ops.silu_mul_act)
        calls.clear()
        runs.append((engine.generate(prompts, max_new_tokens=6, return_entropies=True), dict(calls)))
    (plain, n_plain), (folded, n_folded) = runs
    assert [g.token_ids for g in folded] == [g.token_ids for g in plain]
    assert [g.entropies for g in folded] == [g.entropies for g in plain]  # exactly
    steps_layers = 5 * len(model.model.layers)  # 5 decode steps after the prefill's token
    assert n_plain == {"qdq": n_plain["qdq"]} and n_folded["norm"] == 2 * steps_layers
    assert n_folded["silu"] == steps_layers and n_folded["qdq"] == n_plain["qdq"]  # one quantization each


def test_norm_fold_threads_the_residual(monkeypatch, arch):
    """``FP4REASON_NORM_FOLD``: qkv and gate_up take (residual, delta) and return (output, new residual);
    on the CPU reference math the engine's tokens and entropies are exactly the unfolded ones, and every
    decode norm with a delta (all but layer 0's input norm) went through the fold."""
    import fp4reason.engine.model as m

    model = _quantized(arch, "nvfp4-w4a16")
    prompts = _prompts((6, 3), seed=4)
    plain = Engine(model, None, max_batch_size=2, max_seq_len=32).generate(
        prompts, max_new_tokens=6, return_entropies=True
    )
    calls = []
    real = m.Projection.norm_linear

    def counted(self, *args):
        calls.append(self)
        return real(self, *args)

    # the fold's CUDA-only condition without the device check, for up to 2 tokens (decode, not prefill)
    fold = lambda self, x: self.kind == "fp4" and x.numel() // x.shape[-1] <= 2  # noqa: E731
    monkeypatch.setattr(m.Projection, "folds_norm", fold)
    monkeypatch.setattr(m.Projection, "norm_linear", counted)
    folded = Engine(model, None, max_batch_size=2, max_seq_len=32).generate(
        prompts, max_new_tokens=6, return_entropies=True
    )
    assert [g.token_ids for g in folded] == [g.token_ids for g in plain]
    assert [g.entropies for g in folded] == [g.entropies for g in plain]
    assert len(calls) == 5 * (2 * len(model.model.layers) - 1)  # 5 decode steps after the prefill's token


def test_mxfp4_matches_hf():
    model = _quantized("qwen2", "mxfp4-w4a4")
    prompts = _prompts((4, 7))
    ref = [_hf(model, p, 8)[0] for p in prompts]
    gens = Engine(model, None, max_batch_size=2, max_seq_len=32).generate(prompts, max_new_tokens=8)
    assert [g.token_ids for g in gens] == ref


def test_entropies_match_hf_logits(arch):
    model = tiny_model(arch)
    prompts = _prompts((6, 3))
    gens = Engine(model, None, max_batch_size=2, max_seq_len=64).generate(
        prompts, max_new_tokens=9, return_entropies=True
    )
    for p, g in zip(prompts, gens, strict=True):
        ids, logits = _hf(model, p, 9)
        assert g.token_ids == ids
        torch.testing.assert_close(
            torch.tensor(g.entropies, dtype=torch.float64), _entropy64(logits), atol=1e-5, rtol=1e-5
        )
        assert g.temperatures == [0.0] * 9  # greedy


def test_kv4_matches_hf_kv4_cache():
    model = _quantized("qwen3", "nvfp4-w4a4kv4")  # enables the HF-side KV4Cache too
    prompts = _prompts((7, 4), seed=3)
    engine = Engine(model, None, max_batch_size=2, max_seq_len=64)
    assert engine.decoder.kv4
    gens = engine.generate(prompts, max_new_tokens=8, return_entropies=True)
    plain = Engine(model, None, max_batch_size=2, max_seq_len=64, kv4=False).generate(
        prompts, max_new_tokens=8, return_entropies=True
    )
    for p, g, q in zip(prompts, gens, plain, strict=True):
        ids, logits = _hf(model, p, 8)
        assert g.token_ids == ids
        ent = torch.tensor(g.entropies, dtype=torch.float64)
        torch.testing.assert_close(ent, _entropy64(logits), atol=1e-5, rtol=1e-5)
        # and KV4 really acts: without it the entropies move by far more than the tolerance above
        assert (ent - torch.tensor(q.entropies, dtype=torch.float64)).abs().max() > 1e-3


def test_eos_stops_each_row():
    model = tiny_model("llama")
    prompts = _prompts((5, 8, 3), seed=2)
    free = [_hf(model, p, 12)[0] for p in prompts]
    eos = free[0][4]  # row 0 must stop at its 5th token; the others wherever this id shows up, if at all
    model.generation_config.eos_token_id = eos
    gens = Engine(model, None, max_batch_size=4, max_seq_len=64).generate(prompts, max_new_tokens=12)
    for p, g in zip(prompts, gens, strict=True):
        ref = _hf(model, p, 12)[0]
        assert g.token_ids == ref
        assert g.finish_reason == ("eos" if ref[-1] == eos else "length")
    assert gens[0].token_ids == free[0][: free[0].index(eos) + 1] and gens[0].finish_reason == "eos"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_non_finite_logits_raise(device):
    """Logits that turn NaN (one lm_head row NaN: that token's logit is NaN) stop generate with a clear error,
    from the sampler's own check on CPU, from the recorded entropies after a graph decode on CUDA (whose
    fused greedy sampler once returned token 2**31 - 1 there, and the next step's embedding lookup hit a
    device assert)."""
    model = tiny_model("qwen3").to(device)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    with pytest.raises(ValueError, match="NaN/"):
        Engine(model, None, max_batch_size=2, max_seq_len=64).generate(_prompts((4, 6)), max_new_tokens=5)
    nan = float("nan")
    ents = [[0.5, 1.0, nan], [0.1, 0.2, nan]]
    check_finite_steps(ents, [2, 2])  # NaNs past each row's last token (a row that stopped early) are fine
    with pytest.raises(ValueError, match=r"rows \[1\] .*row 1 from generated token 2 on"):
        check_finite_steps(ents, [2, 3])


def test_chunks_and_batch_invariance():
    model = tiny_model("qwen3")
    prompts = _prompts((3, 9, 5, 6, 2), seed=4)
    engine = Engine(model, None, max_batch_size=2, max_seq_len=48)
    batched = engine.generate(prompts, max_new_tokens=6)
    single = [engine.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    math = Engine(model, None, max_batch_size=4, max_seq_len=48, attn="math").generate(
        prompts, max_new_tokens=6
    )
    assert [g.token_ids for g in math] == [g.token_ids for g in single]


def test_sampling_is_seeded():
    engine = Engine(tiny_model("qwen2"), None, max_batch_size=2, max_seq_len=48)
    cfg = SamplerConfig(mode="fixed", temperature=1.0, top_p=1.0)
    prompts = _prompts((4, 4), seed=5)
    a = engine.generate(prompts, sampler=cfg, max_new_tokens=16, seed=7, return_entropies=True)
    b = engine.generate(prompts, sampler=cfg, max_new_tokens=16, seed=7)
    c = engine.generate(prompts, sampler=cfg, max_new_tokens=16, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert a[0].temperatures == [1.0] * 16


def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: exactly 256 ids, like the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-in for each byte, so that id == byte value
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(extra)): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok)
    out.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    return out


def test_text_prompt_stream_and_chat_template():
    tok = _byte_tokenizer()
    model = tiny_model("qwen3")
    engine = Engine(model, tok, max_batch_size=2, max_seq_len=96)
    pieces = []
    (g,) = engine.generate(["héllo wörld"], max_new_tokens=24, stream=pieces.append)
    assert g.token_ids == _hf(model, list("héllo wörld".encode()), 24)[0]
    assert g.text == tok.decode(g.token_ids) and "".join(pieces) == g.text
    (c,) = engine.generate(["hi"], max_new_tokens=4, chat_template=True)
    assert c.token_ids == _hf(model, list(b"<user>hi\n<assistant>"), 4)[0]


def test_bad_inputs():
    engine = Engine(tiny_model("llama"), None, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        engine.generate([list(range(10))], max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(["text"], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], max_new_tokens=2)
    model = tiny_model("llama")
    model.config = copy.deepcopy(model.config)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        Engine(model, None)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(tiny_model("llama"), None, use_cuda_graphs=True, device="cpu")


def _kernel_sized_model(scheme: str = "nvfp4-w4a16"):
    """A small bf16 NVFP4 Qwen3 whose K dims are multiples of 128, so decode runs the CUDA kernel."""
    from transformers import AutoModelForCausalLM

    from fp4reason.quant import quantize_model

    cfg = tiny_config("qwen3")
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    calib = [torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(1)).tolist()]
    return quantize_model(model, scheme, calib, progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["nvfp4-w4a16", "nvfp4-w4a4"])
def test_cuda_gated_mlp_equals_separate_activation(scheme):
    """On CUDA the engine's gate/up projection applies silu(gate) * up in the kernel's epilogue; the MLP
    output equals the un-gated projection followed by torch's silu * up, then the same down projection."""
    from fp4reason.engine.model import Ops, Projection
    from fp4reason.kernels import silu_mul_reference

    model = _kernel_sized_model(scheme).cuda()
    mlp = model.model.layers[0].mlp
    engine = Engine(model, None, max_batch_size=2, max_seq_len=64)
    layer = engine.decoder.layers[0]
    assert layer.gate_up.gated
    plain = Projection([mlp.gate_proj, mlp.up_proj])
    assert not plain.gated
    for ops in (Ops(), Ops(compiled=True)):
        x = torch.randn(3, 1, 256, device="cuda", dtype=torch.bfloat16)
        delta = torch.randn_like(x)
        _, got = layer._mlp(x, delta, ops)
        _, gu = layer._norm_proj(x, delta, layer.post_norm, plain, ops)  # the same norm (and input quantizer)
        a = silu_mul_reference(gu)
        if layer.down.folds_act(ops):
            want = layer.down(ops.act_nvfp4(a, layer.down.input_global_scale), ops, quantized=True)
        else:
            want = layer.down(a, ops)
        assert got.shape == want.shape == (3, 1, 256)
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 2e-2, (scheme, ops.compiled, rel)


@pytest.mark.gpu
def test_cuda_norm_fold_equals_separate_norm(monkeypatch):
    """On CUDA with ``FP4REASON_NORM_FOLD`` the qkv / gate_up kernels add the residual and normalize: the
    residual equals torch's add exactly, the projection the separate norm's up to rounding (the kernel sums
    the squares in another order), at every batch size up to 16."""
    import fp4reason.engine.model as m
    from fp4reason.engine.model import Ops

    model = _kernel_sized_model().cuda()
    layer = Engine(model, None, max_batch_size=2, max_seq_len=64).decoder.layers[1]
    ops = Ops(compiled=True)
    for b in (1, 2, 5, 16):
        x = torch.randn(b, 1, 256, device="cuda", dtype=torch.bfloat16)
        delta = torch.randn_like(x)
        for norm, proj in ((layer.in_norm, layer.qkv), (layer.post_norm, layer.gate_up)):
            monkeypatch.setattr(m, "_NORM_FOLD", 0)
            h0, y0 = layer._norm_proj(x, delta, norm, proj, ops)
            monkeypatch.setattr(m, "_NORM_FOLD", 16)
            assert proj.folds_norm(x)
            h1, y1 = layer._norm_proj(x, delta, norm, proj, ops)
            assert torch.equal(h1, x + delta) and torch.equal(h0, h1)
            rel = ((y1.float() - y0.float()).norm() / y0.float().norm()).item()
            assert y1.shape == y0.shape and rel < 1e-2, (b, rel)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp32", "nvfp4-w4a4kv4", "bf16-kernel"])
def test_cuda_graphs_match_eager(case):
    if case == "bf16-kernel":
        model, compile = _kernel_sized_model(), False  # same kernels both ways: bit-identical steps
    else:
        model, compile = (tiny_model("qwen3") if case == "fp32" else _quantized("qwen3", case)), None
    model = model.cuda()
    prompts = _prompts((5, 30, 12), seed=6)
    kw = dict(max_new_tokens=40, return_entropies=True)
    eager = Engine(model, None, max_batch_size=4, max_seq_len=128, use_cuda_graphs=False, compile=False)
    fast = Engine(model, None, max_batch_size=4, max_seq_len=128, kv_bucket=16, compile=compile)
    a, b = eager.generate(prompts, **kw), fast.generate(prompts, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    torch.testing.assert_close(
        torch.tensor([g.entropies for g in a]), torch.tensor([g.entropies for g in b]), atol=1e-4, rtol=1e-4
    )
    cfg = SamplerConfig(mode="reset", t_low=0.3, tau0=0.5)  # switching sampler: new graphs, same pool
    first = fast.generate(prompts, sampler=cfg, max_new_tokens=20, seed=3)  # captures its graphs
    again = fast.generate(prompts, sampler=cfg, max_new_tokens=20, seed=3)  # replays them
    assert [g.token_ids for g in first] == [g.token_ids for g in again]


def _reset_temperatures(ents, toks, cfg, nl_ids) -> list[float]:
    """ReSET's temperature rule (reset_reqat.md 1.3-1.4) in plain Python, on the engine's own entropies and
    tokens: step estimate = window mean for a step's first w tokens, then the causal step mean."""
    w, out = cfg.window, []
    ring, win_sum, step_sum, step_n, glob_sum, n = [0.0] * w, 0.0, 0.0, 0, 0.0, 0
    for t, h in enumerate(ents):
        if t >= 2 and toks[t - 1] in nl_ids and toks[t - 2] in nl_ids:
            step_sum, step_n = 0.0, 0
        glob_mean = glob_sum / max(n, 1)
        win_mean = glob_mean if n <= w else win_sum / w
        step = win_mean if step_n < w else step_sum / step_n
        est, mean = (h, h) if n == 0 else (step, glob_mean)
        tau = est if est > mean else cfg.tau0
        out.append(cfg.t_high if h >= tau else cfg.t_low)
        old, ring[n % w] = ring[n % w], h
        win_sum, step_sum, step_n, glob_sum, n = (
            win_sum + h - old,
            step_sum + h,
            step_n + 1,
            glob_sum + h,
            n + 1,
        )
    return out


def test_reset_temperatures_follow_the_rule():
    tok = _byte_tokenizer()
    engine = Engine(tiny_model("qwen2"), tok, max_batch_size=2, max_seq_len=96)
    cfg = SamplerConfig(mode="reset", t_low=0.3, t_high=1.0, tau0=5.5325, window=4, top_p=1.0)
    for seed in (0, 1):  # the second call must start from a fresh sampler state
        gens = engine.generate(
            ["ab\n\n", "xyz"], sampler=cfg, max_new_tokens=30, seed=seed, return_entropies=True
        )
        for g in gens:
            temps = [round(t, 6) for t in g.temperatures]  # float32 on the device
            assert temps == _reset_temperatures(g.entropies, g.token_ids, cfg, {10})
            assert set(temps) == {0.3, 1.0}


def test_generate_command(tmp_path, capsys):
    import argparse

    from fp4reason.commands import generate

    model, tok = tiny_model("llama"), _byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "generate",
            str(tmp_path),
            "--prompt",
            "abc",
            "--prompt",
            "de",
            "--sampler",
            "greedy",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for prompt in ("abc", "de"):
        ids = _hf(model, tok(prompt).input_ids, 5)[0]
        assert f"=== [{0 if prompt == 'abc' else 1}] {prompt!r}\n{tok.decode(ids)}\n" in out
