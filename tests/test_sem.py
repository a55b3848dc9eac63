"""SEM against a direct float64 rendering of ReQAT's formula (entropies, percentile, weights, gradient)."""

import math

import pytest
import torch

from fp4reason.train.sem import sem_penalty, sem_weights, token_entropy


def _entropy_py(row: list[float]) -> float:
    m = max(row)
    z = sum(math.exp(v - m) for v in row)
    ps = [math.exp(v - m) / z for v in row]
    return -sum(p * math.log(p) for p in ps if p > 0)


def _quantile_py(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _sem_py(logits, labels, q=0.75, eps=1e-6):
    hs = [
        _entropy_py(logits[b][t])
        for b in range(len(labels))
        for t in range(len(labels[0]))
        if labels[b][t] != -100
    ]
    tau, h_min = _quantile_py(hs, q), min(hs)
    ws = [max(0.0, 1 - (h - h_min) / (tau - h_min + eps)) for h in hs]
    return hs, ws, sum(w * h for w, h in zip(ws, hs, strict=True)) / len(hs)


def _case(seed=0, b=2, t=9, v=11):
    g = torch.Generator().manual_seed(seed)
    # spread of sharp and flat rows so the weights take values across [0, 1]
    logits = torch.randn(b, t, v, generator=g) * torch.linspace(0.2, 6, b * t).view(b, t, 1)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[1, -1] = -100
    return logits, labels


def test_weights_and_value_match_formula():
    logits, labels = _case()
    hs, ws, ref = _sem_py(logits.double().tolist(), labels.tolist())
    h = token_entropy(logits, labels != -100, chunk=4)
    assert torch.allclose(h.double(), torch.tensor(hs, dtype=torch.float64), atol=1e-5)
    w = sem_weights(h)
    assert torch.allclose(w.double(), torch.tensor(ws, dtype=torch.float64), atol=1e-4)
    assert w.max() == 1.0 and (w == 0).sum() >= len(hs) // 4  # weight 1 at H_min, top quarter zeroed
    assert sem_penalty(logits, labels).item() == pytest.approx(ref, rel=1e-5)


def test_percentile_changes_threshold():
    logits, labels = _case(seed=3)
    for q in (0.25, 0.5, 0.9):
        assert sem_penalty(logits, labels, percentile=q).item() == pytest.approx(
            _sem_py(logits.double().tolist(), labels.tolist(), q)[2], rel=1e-5
        )


def test_gradient_matches_autograd_of_direct_rendering():
    logits, labels = _case(seed=1)
    x = logits.clone().requires_grad_(True)
    sem_penalty(x, labels).backward()

    ref = logits.double().clone().requires_grad_(True)
    mask = labels != -100
    logp = torch.log_softmax(ref[mask], -1)
    h = -(logp.exp() * logp).sum(-1)
    w = torch.tensor(_sem_py(logits.double().tolist(), labels.tolist())[1], dtype=torch.float64)
    (w * h).mean().backward()  # weights are constants
    assert torch.allclose(x.grad.double(), ref.grad, atol=1e-6)
    assert x.grad[~mask].abs().max() == 0  # ignored positions get no gradient


def test_chunking_does_not_change_result():
    logits, labels = _case(seed=2, t=13)
    mask = labels != -100
    outs = []
    for chunk in (1, 5, 1000):
        x = logits.clone().requires_grad_(True)
        h = token_entropy(x, mask, chunk=chunk)
        (h * torch.arange(len(h))).sum().backward()
        outs.append((h, x.grad))
    for h, g in outs[1:]:
        assert torch.equal(h, outs[0][0]) and torch.allclose(g, outs[0][1], atol=1e-7)


def test_bf16_logits_give_float32_entropy_and_bf16_grad():
    logits, labels = _case()
    x = logits.bfloat16().requires_grad_(True)
    p = sem_penalty(x, labels)
    p.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    ref = _sem_py(x.detach().double().tolist(), labels.tolist())[2]
    assert p.item() == pytest.approx(ref, rel=1e-4)


def test_no_label_tokens_and_bad_input():
    logits, labels = _case()
    x = logits.clone().requires_grad_(True)
    p = sem_penalty(x, torch.full_like(labels, -100))
    p.backward()
    assert p.item() == 0.0 and x.grad.abs().max() == 0
    with pytest.raises(ValueError, match="do not match"):
        sem_penalty(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="percentile"):
        sem_penalty(logits, labels, percentile=1.5)


def test_chunked_cross_entropy_matches_float64_reference():
    from fp4reason.train.losses import chunked_cross_entropy

    logits, labels = _case(seed=4, t=13)
    ref_in = logits.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_in.flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    for chunk in (1, 4, None):
        x = logits.clone().requires_grad_(True)
        ce = chunked_cross_entropy(x, labels, chunk=chunk)
        ce.backward()
        assert ce.dtype == torch.float32 and ce.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(x.grad.double(), ref_in.grad, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be in"):
        chunked_cross_entropy(logits, torch.full_like(labels, 11))
