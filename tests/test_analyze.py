"""Entropy diagnostics: token classes, step splitting, teacher-forced metrics against a float64 reference,
binning, and the end-to-end analysis on a tiny model."""

import copy

import numpy as np
import pytest
import torch
from test_eval import FIXTURE, byte_tokenizer, tiny_lm

from fp4reason.eval.backends import HFBackend
from fp4reason.eval.data import load_jsonl
from fp4reason.eval.diagnostics import (
    TokenStats,
    analyze_models,
    analyze_stats,
    encode_traces,
    step_ids,
    teacher_force,
    token_class,
)


def test_token_class():
    assert [token_class(t) for t in ["12", " +", "=", " 3.5", "x2"]] == ["symbolic"] * 5
    assert [token_class(t) for t in [" the", "Answer", "é"]] == ["word"] * 3
    assert [token_class(t) for t in [" ", "\n", ".", ","]] == ["other"] * 4


def test_step_ids_follow_reset_boundaries():
    pieces = ["a", "b", ".\n\n", "c", "\n", "\n", "d", "\n", "e"]
    assert step_ids(pieces).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _reference(model_a, model_b, prompt, trace):
    """float64 per-position metrics, computed position by position with fresh forward passes."""
    rows = []
    for t in range(len(trace)):
        ids = torch.tensor([prompt + trace[:t]])
        la = model_a(input_ids=ids).logits[0, -1].double()
        lb = model_b(input_ids=ids).logits[0, -1].double()
        pa, pb = la.softmax(-1), lb.softmax(-1)
        rows.append(
            dict(
                h=float(-(pa * pa.log()).sum()),
                hq=float(-(pb * pb.log()).sum()),
                ta=float(1 - pa.max()),
                tb=float(1 - pb.max()),
                flip=bool(la.argmax() != lb.argmax()),
                kl=float((pa * (pa.log() - pb.log())).sum()),
            )
        )
    return rows


@torch.no_grad()
def test_teacher_force_matches_float64_reference():
    tok = byte_tokenizer()
    a = tiny_lm("qwen2", seed=0).double()
    b = copy.deepcopy(a)
    for p in b.parameters():
        p.add_(0.05 * torch.randn_like(p))
    prompt, trace = [10, 20, 30], [40, 50, 60, 70, 10]
    s = teacher_force(a, b, tok, [(prompt, trace)])
    ref = _reference(a, b, prompt, trace)
    np.testing.assert_allclose(s.h_bf16, [r["h"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose(s.h_fp4, [r["hq"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose(s.tail_bf16, [r["ta"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose(s.tail_fp4, [r["tb"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose(s.kl, [r["kl"] for r in ref], rtol=1e-4, atol=1e-9)
    assert s.flip.tolist() == [r["flip"] for r in ref]
    assert s.kl.min() > 0
    same = teacher_force(a, a, tok, [(prompt, trace)])
    assert not same.flip.any() and np.allclose(same.kl, 0, atol=1e-9)


def test_analyze_stats_bins_and_hand_example():
    n = 40
    h = np.arange(n, dtype=float) / 10  # ascending entropies: bin b holds positions 2b, 2b+1
    s = TokenStats(
        h_bf16=h,
        h_fp4=h + 0.1,
        tail_bf16=np.full(n, 0.1),
        tail_fp4=np.full(n, 0.2),
        flip=np.arange(n) >= 30,
        kl=np.full(n, 0.01),
        cls=np.array(["symbolic", "word"] * 20),
        in_uncertain_step=np.arange(n) % 4 == 0,
    )
    res = analyze_stats(s, n_bins=20)
    assert [b["n"] for b in res["bins"]] == [2] * 20
    assert [b["flip_rate"] for b in res["bins"]] == [0.0] * 15 + [1.0] * 5
    assert res["bins"][3]["h_bf16"] == pytest.approx((0.6 + 0.7) / 2)
    assert res["overall"]["rho"] == pytest.approx((0.2 + 1e-6) / (0.1 + 1e-6))
    assert res["overall"]["entropy_shift"] == pytest.approx(0.1)
    assert res["by_class"]["symbolic"]["n"] == 20 and res["by_class"]["other"] == {"n": 0}
    # top 10% entropy = positions 36..39; of those, uncertain-step ones are 36 only
    assert res["high_entropy_in_uncertain_steps"]["n"] == 1
    with pytest.raises(ValueError, match="at least 20"):
        analyze_stats(TokenStats(*(a[:5] for a in (h, h, h, h, s.flip, h, s.cls, s.flip))))


def test_analyze_models_end_to_end(tmp_path):
    tok = byte_tokenizer()
    bf16 = tiny_lm("qwen2")
    try:
        from fp4reason.quant import quantize_model

        fp4 = quantize_model(copy.deepcopy(bf16), "nvfp4-w4a4", tokenizer=tok)
    except ImportError:  # quant not available: a perturbed copy stands in
        fp4 = copy.deepcopy(bf16)
        with torch.no_grad():
            for p in fp4.parameters():
                p.add_(0.02 * torch.randn_like(p))
    problems = load_jsonl(FIXTURE)
    res = analyze_models(
        bf16, fp4, tok, problems, HFBackend(bf16, tok, batch_size=4), tmp_path, max_new_tokens=12, seed=0
    )
    assert res["n_traces"] >= 1 and res["n_tokens"] >= 20
    for name in ["summary.txt", "stats.json", "flip_rate.png", "rho.png", "kl.png", "entropy_shift.png"]:
        assert (tmp_path / name).stat().st_size > 0
    assert "flip rate" in (tmp_path / "summary.txt").read_text()
    assert res["overall"]["kl"] > 0  # FP4 really changes the distribution
    traces = encode_traces(tok, ["hi"], ["ab"])
    assert (
        traces[0][1] == tok("ab", add_special_tokens=False)["input_ids"]
        and encode_traces(tok, ["x"], [""]) == []
    )
