"""QAT model (W4A4 linears, KV4 attention, STE), trainer resume equivalence, TAQ data order, FP4 export."""

import json

import pytest
import torch
from conftest import tiny_model
from torch.nn import functional as F

from fp4reason.formats import qdq_kv4, qdq_nvfp4
from fp4reason.train import Example, QATLinear, TrainConfig, prepare_qat, strip_qat, train
from fp4reason.train.data import collate, epoch_orders, step_schedule, trace_order
from fp4reason.train.fakequant import attention_modules
from fp4reason.train.qfit import set_k_shift


def _examples(n=16, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (t - i % 3,), generator=g)  # ragged lengths: padding is exercised
        labels = ids.clone()
        labels[: 5 + i % 4] = -100  # prompt
        out.append(Example(ids, labels))
    return out


def test_qat_linear_forward_and_ste_gradient():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    lin.__class__ = QATLinear
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    y = lin(x)
    # reference: quantized copies as leaves; STE means their gradients are the real gradients
    xq = qdq_nvfp4(x.detach()).requires_grad_(True)
    wq = qdq_nvfp4(lin.weight.detach()).requires_grad_(True)
    ref = F.linear(xq, wq, lin.bias.detach())
    assert torch.equal(y, ref)
    assert not torch.equal(xq, x) and not torch.equal(wq, lin.weight)  # quantization really happened
    gy = torch.randn(3, 8, generator=g)
    y.backward(gy)
    ref.backward(gy)
    assert torch.allclose(x.grad, xq.grad) and torch.allclose(lin.weight.grad, wq.grad)


def test_prepare_qat_swaps_decoder_linears_only_and_strips_back(arch):
    m = tiny_model(arch)
    x = torch.randint(0, 256, (2, 24))
    y0 = m(x).logits
    keys = list(m.state_dict())
    prepare_qat(m)
    kinds = {type(mod) for name, mod in m.model.layers.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert kinds == {QATLinear} and type(m.lm_head) is torch.nn.Linear
    assert list(m.state_dict()) == keys
    y1 = m(x).logits
    assert 0 < (y1 - y0).abs().max() < 0.3 * y0.abs().max()
    strip_qat(m)
    assert torch.equal(m(x).logits, y0)


def test_qat_model_matches_manual_w4a4kv4_layer():
    """One decoder layer's attention in QAT form equals a hand-written W4A4 + KV4 (shifted keys) rendering."""
    m = tiny_model("llama")
    prepare_qat(m)
    attn = attention_modules(m)[0]
    shift = torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(1))
    set_k_shift(attn, shift)
    h = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(10)[None]
    cos, sin = m.model.rotary_emb(h, pos)
    out, _ = attn(h, (cos, sin), None)

    def lin(mod, x):
        return F.linear(qdq_nvfp4(x), qdq_nvfp4(mod.weight))

    def rope(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos[:, None] + torch.cat((-t2, t1), -1) * sin[:, None]

    q = rope(lin(attn.q_proj, h).view(1, 10, 4, 16).transpose(1, 2))
    k = rope(lin(attn.k_proj, h).view(1, 10, 2, 16).transpose(1, 2))
    v = lin(attn.v_proj, h).view(1, 10, 2, 16).transpose(1, 2)
    k, v = qdq_kv4(k - shift).repeat_interleave(2, 1), qdq_kv4(v).repeat_interleave(2, 1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 10, 64)
    assert torch.allclose(out, lin(attn.o_proj, o), atol=1e-5)


def test_kv4_straight_through_reaches_key_projection():
    m = tiny_model("qwen3")
    prepare_qat(m)
    x = torch.randint(0, 256, (2, 16))
    F.cross_entropy(m(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    for a in attention_modules(m):
        assert a.k_proj.weight.grad.abs().sum() > 0 and a.v_proj.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def _cfg(out, **kw):
    base = dict(
        out_dir=str(out),
        qat=True,
        sem_lambda=0.1,
        batch_size=2,
        grad_accum=2,
        lr=2e-3,
        save_every=2,
        progress=False,
        mixed_precision="no",
    )
    return TrainConfig(**{**base, **kw})


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted_run(tmp_path):
    ex = _examples()
    full = tiny_model("qwen2")
    train(_cfg(tmp_path / "a"), model=full, examples=ex)
    # "killed" after 3 of 4 steps (checkpoints at 2 and 3), then the same command again on a fresh model
    cut = tiny_model("qwen2")
    s = train(_cfg(tmp_path / "b", stop_after=3), model=cut, examples=ex)
    assert s["steps_done"] == 3 and not s["finished"]
    resumed = tiny_model("qwen2")
    s = train(_cfg(tmp_path / "b"), model=resumed, examples=ex)
    assert s["finished"]
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, b)
        for a, b in zip(full.parameters(), tiny_model("qwen2").parameters(), strict=True)
    )
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and [r["lr"] for r in la] == [
        r["lr"] for r in lb
    ]
    assert (tmp_path / "b" / "final" / "config.json").is_file()


def test_step_weights_trains_bit_identically(tmp_path):
    """The trainer's ``step_weights`` (one batched weight quantization per forward) changes no number."""
    ex = _examples()
    a, b = tiny_model("qwen3"), tiny_model("qwen3")
    train(_cfg(tmp_path / "a", save_every=0, save_final=False), model=a, examples=ex)
    train(_cfg(tmp_path / "b", save_every=0, save_final=False, step_weights=True), model=b, examples=ex)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert [r["loss"] for r in _log(tmp_path / "a")] == [r["loss"] for r in _log(tmp_path / "b")]
    untrained = tiny_model("qwen3").model.layers[0].mlp.up_proj.weight
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, untrained)


def test_taq_stage2_is_prefix_of_stage1_order(tmp_path):
    ex = _examples(24)
    train(
        _cfg(tmp_path / "s1", qat=False, sem_lambda=0.0, num_traces=16),
        model=tiny_model("llama"),
        examples=ex,
    )
    train(_cfg(tmp_path / "s2", num_traces=8), model=tiny_model("llama"), examples=ex)
    seen1 = [i for r in _log(tmp_path / "s1") for i in r["traces"]]
    seen2 = [i for r in _log(tmp_path / "s2") for i in r["traces"]]
    assert len(seen1) == 16 and len(seen2) == 8 and seen2 == seen1[:8]
    assert sorted(seen1) != list(range(16))  # a shuffled subset of the file, not its head
    assert seen1 == trace_order(24, 42)[:16]


def test_data_order_and_schedule():
    assert trace_order(10, 1) == trace_order(10, 1) and trace_order(10, 1) != trace_order(10, 2)
    ids = epoch_orders(10, 3, take=4, epochs=3)
    assert ids[:4] == trace_order(10, 3)[:4] and sorted(ids[4:8]) == sorted(ids[:4]) == sorted(ids[8:])
    sched = step_schedule(list(range(11)), batch_size=2, grad_accum=2, world=1)
    assert sched == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        step_schedule([1, 2], batch_size=2, grad_accum=2)
    b = collate(_examples(2), pad_id=7)
    assert b["input_ids"][1, -1] == 7 and b["labels"][1, -1] == -100 and b["attention_mask"][1].sum() == 19


def test_completion_only_tokenization():
    try:
        from transformers import AutoTokenizer

        from fp4reason.models import prepare_default_model

        tok = AutoTokenizer.from_pretrained(prepare_default_model("smollm2-135m"))
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"default tokenizer not available: {e}")
    from fp4reason.train.data import prompt_ids, tokenize_trace

    e = tokenize_trace(tok, {"prompt": "What is 2+3?", "completion": "2+3 = 5. Answer: 5"}, max_len=512)
    p = prompt_ids(tok, "What is 2+3?")
    assert e.input_ids[: len(p)].tolist() == p and (e.labels[: len(p)] == -100).all()
    assert tok.decode(e.labels[len(p) :]) == "2+3 = 5. Answer: 5" + tok.eos_token
    assert len(tokenize_trace(tok, {"prompt": "x", "completion": "y " * 100}, max_len=40).input_ids) == 40


def test_export_fp4_checkpoint(tmp_path):
    pytest.importorskip("fp4reason.quant")
    from fp4reason.quant import FP4Linear, load_quantized
    from fp4reason.train.export import export_fp4
    from fp4reason.train.qfit import load_k_shift

    m = tiny_model("qwen3")
    shifts = [torch.randn(1, 2, 1, 16) for _ in range(2)]
    for a, sh in zip(attention_modules(m), shifts, strict=True):
        set_k_shift(a, sh)
    prepare_qat(m)
    trained = {
        n: mod.weight.detach().clone()
        for n, mod in m.model.layers.named_modules()
        if isinstance(mod, QATLinear)
    }
    x = torch.randint(0, 256, (2, 32))
    out = export_fp4(m, None, tmp_path / "fp4", calib_data=x, progress=False)
    q, _ = load_quantized(out, dtype=torch.float32)
    fp4 = {n: mod for n, mod in q.model.layers.named_modules() if isinstance(mod, FP4Linear)}
    assert fp4.keys() == trained.keys() and len(fp4) == 14
    for n, w in trained.items():
        if n.endswith(("o_proj", "down_proj")):  # unfused: same tensor scale as the training fake quant
            assert torch.equal(fp4[n].dequantized_weight(), qdq_nvfp4(w)), n
        assert (fp4[n].dequantized_weight() - w).norm() < 0.2 * w.norm(), n
    assert load_k_shift(q, out / "k_shift.safetensors") == 2
    assert all(torch.equal(a.k_shift, sh) for a, sh in zip(attention_modules(q), shifts, strict=True))


def test_eval_weight_cache_follows_weight_updates():
    lin = torch.nn.Linear(32, 8, bias=False)
    lin.__class__ = QATLinear
    lin.eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        y1 = lin(x)
        assert torch.equal(y1, F.linear(qdq_nvfp4(x), qdq_nvfp4(lin.weight)))
        lin.weight.mul_(3.0)  # an in-place update (as the optimizer does) must invalidate the cache
        assert torch.equal(lin(x), F.linear(qdq_nvfp4(x), qdq_nvfp4(lin.weight)))


def test_synthetic_problems_are_correct_and_disjoint():
    import re

    from fp4reason.train.synthetic import make_splits

    train_set, test_set = make_splits(200, 50)
    assert not {p["prompt"] for p in train_set} & {p["prompt"] for p in test_set}
    for p in train_set + test_set:
        c = p["completion"]
        for lhs, rhs in re.findall(r"(\d+ [-+*] \d+) = (\d+)", c):
            assert eval(lhs) == int(rhs), c  # noqa: S307 (digits and one operator)
        assert [c[s:e] for s, e in p["targets"]] == re.findall(r"= (\d+)", c)
        assert c.endswith(f"Answer: {p['answer']}") and p["answer"] == c[slice(*p["targets"][-1])]
