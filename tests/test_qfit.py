"""Q-FIT: attention unchanged in float32 (Qwen2, Qwen3, Llama), lower KV4 attention error on held-out text."""

import pytest
import torch
from conftest import tiny_model

from fp4reason.formats import qdq_kv4
from fp4reason.train.fakequant import attention_modules, kv4_attention_forward, prepare_qat
from fp4reason.train.qfit import (
    apply_scale,
    capture_attention_inputs,
    kv4_attention_error,
    load_k_shift,
    qfit,
    save_k_shift,
    set_k_shift,
)


def _with_key_outliers(arch: str):
    """Tiny model whose layer-0 keys have a few large channels (as real LLM keys do)."""
    m = tiny_model(arch)
    with torch.no_grad():
        attn = m.model.layers[0].self_attn
        attn.q_proj.weight *= 3  # peakier attention, so key errors show in the output
        for c in (3, 21):  # one in each RoPE half, different pairs
            attn.k_proj.weight[c] *= 12
            if arch == "qwen3":
                attn.k_norm.weight[c % 16] *= 4
    return m


def _ids(seed: int, n: int = 4, t: int = 48):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_qfit_keeps_attention_and_lowers_kv4_error(arch):
    m = _with_key_outliers(arch)
    held = _ids(1)
    y0 = m(held).logits
    before = [
        kv4_attention_error(a, b)
        for a, b in zip(attention_modules(m), capture_attention_inputs(m, held), strict=True)
    ]
    fits = qfit(m, _ids(0), grid=5, progress=False)
    # exact in float32: the scale is folded (and RoPE-paired), the shift is ignored by plain sdpa ...
    assert torch.allclose(m(held).logits, y0, atol=2e-5, rtol=0)
    # ... and cancels in softmax when the QAT attention subtracts it (KV quantization off)
    prepare_qat(m, weights=False)
    for a in attention_modules(m):
        a._fp4_kv_quant = False
        assert a.k_shift.abs().sum() > 0 or any(f.alpha_m == 0 for f in fits)
    assert torch.allclose(m(held).logits, y0, atol=2e-5, rtol=0)
    after = [
        kv4_attention_error(a, b)
        for a, b in zip(attention_modules(m), capture_attention_inputs(m, held), strict=True)
    ]
    # the outlier layer improves on unseen tokens (values, untouched by Q-FIT, dominate the rest of the error)
    assert after[0] < before[0] and fits[0].err_after < fits[0].err_before, (before, after, fits)
    assert all(f.err_after <= f.err_before for f in fits)


def test_qwen2_bias_and_gqa_scale_folding():
    m = tiny_model("qwen2")
    attn = m.model.layers[1].self_attn
    d, kvh = attn.head_dim, 2
    s_half = torch.rand(kvh, d // 2) + 0.5
    s = torch.cat([s_half, s_half], -1)
    wq, bq, wk, bk = (
        t.detach().clone()
        for t in (attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias)
    )
    apply_scale(attn, s)
    # query head h belongs to KV head h // 2 (4 query heads, 2 KV heads)
    for h in range(4):
        rows = slice(h * d, (h + 1) * d)
        assert torch.allclose(attn.q_proj.weight[rows], wq[rows] * s[h // 2, :, None])
        assert torch.allclose(attn.q_proj.bias[rows], bq[rows] * s[h // 2])
    for g in range(kvh):
        rows = slice(g * d, (g + 1) * d)
        assert torch.allclose(attn.k_proj.weight[rows], wk[rows] / s[g, :, None])
        assert torch.allclose(attn.k_proj.bias[rows], bk[rows] / s[g])


def test_scale_must_be_rope_paired_and_head_shared_for_qwen3():
    attn = tiny_model("llama").model.layers[0].self_attn
    with pytest.raises(ValueError, match="paired"):
        apply_scale(attn, torch.rand(2, 16) + 0.5)
    q3 = tiny_model("qwen3").model.layers[0].self_attn
    with pytest.raises(ValueError, match="head-shared"):
        apply_scale(q3, torch.ones(2, 16))


def test_kv4_attention_hook_subtracts_shift_then_quantizes():
    m = tiny_model("llama")
    prepare_qat(m, weights=False)
    attn = attention_modules(m)[0]
    shift = torch.randn(1, 2, 1, 16)
    set_k_shift(attn, shift)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, 8, 16, generator=g),
        torch.randn(1, 2, 8, 16, generator=g),
        torch.randn(1, 2, 8, 16, generator=g),
    )
    out, _ = kv4_attention_forward(attn, q, k, v, None, scaling=0.25, is_causal=True)
    kq, vq = qdq_kv4(k - shift).repeat_interleave(2, 1), qdq_kv4(v).repeat_interleave(2, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kq, vq, is_causal=True, scale=0.25).transpose(
        1, 2
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_k_shift_round_trip(tmp_path):
    m = tiny_model("qwen2")
    for i, a in enumerate(attention_modules(m)):
        set_k_shift(a, torch.full((1, 2, 1, 16), float(i + 1)))
    save_k_shift(m, tmp_path / "k_shift.safetensors")
    m2 = tiny_model("qwen2")
    assert load_k_shift(m2, tmp_path / "k_shift.safetensors") == 2
    assert all(
        torch.equal(a.k_shift, torch.full((1, 2, 1, 16), float(i + 1)))
        for i, a in enumerate(attention_modules(m2))
    )
    with pytest.raises(ValueError, match="shape"):
        set_k_shift(attention_modules(m2)[0], torch.zeros(1, 4, 1, 16))


def test_real_model_activations():
    """SmolLM2-135M (first 3 layers) on real text: Q-FIT lowers held-out KV4 attention error."""
    try:
        from fp4reason.models import load_model
        from fp4reason.quant import calibration_text

        model, tok = load_model("smollm2-135m", dtype=torch.float32)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"default model not available: {e}")
    model.model.layers = model.model.layers[:3]
    ids = torch.tensor(tok(calibration_text(), add_special_tokens=False)["input_ids"])
    cal, held = ids[:256].view(4, 64), ids[256:512].view(4, 64)
    y0 = model(held).logits
    before = [
        kv4_attention_error(a, b)
        for a, b in zip(attention_modules(model), capture_attention_inputs(model, held), strict=True)
    ]
    qfit(model, cal, grid=4, progress=False)
    after = [
        kv4_attention_error(a, b)
        for a, b in zip(attention_modules(model), capture_attention_inputs(model, held), strict=True)
    ]
    assert sum(after) < 0.7 * sum(before), (before, after)
    assert (model(held).logits - y0).abs().max() < 1e-3 * y0.abs().max()
