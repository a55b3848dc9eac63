"""Faster QAT paths (shared q/k/v and gate/up input quantization, per-step batched weight quantization)
give the same logits and gradients, bit for bit, as quantizing every input and weight at every Linear call."""

import copy

import pytest
import torch
from conftest import tiny_model

from fp4reason.train import fakequant
from fp4reason.train.fakequant import QATLinear, prepare_qat, strip_qat


def _train(model, ids, *, steps: int = 2, ckpt: bool = False, autocast: bool = False):
    """(logits, grads) per step of a short AdamW run; counts NVFP4 quantize-dequantize calls."""
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        out.append((logits.detach().clone(), [p.grad.clone() for p in model.parameters()]))
        opt.step()  # the weights change in place: a stale per-step weight would show in step 2
        opt.zero_grad()
    return out


def _counted(monkeypatch) -> list[int]:
    calls, single, stacked = [0, 0], fakequant._QDQ["nvfp4"], fakequant._QDQ["nvfp4_stacked"]

    def one(x, *a):
        calls[0] += 1
        return single(x, *a)

    def many(x):
        calls[1] += 1
        return stacked(x)

    monkeypatch.setitem(fakequant._QDQ, "nvfp4", one)
    monkeypatch.setitem(fakequant._QDQ, "nvfp4_stacked", many)
    return calls


@pytest.mark.parametrize("ckpt,autocast", [(False, False), (True, True)])
def test_fast_paths_are_bit_identical(arch, monkeypatch, ckpt, autocast):
    base, ids = tiny_model(arch), torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = _train(prepare_qat(copy.deepcopy(base), share_inputs=False), ids, ckpt=ckpt, autocast=autocast)
    passes = 2 * (2 if ckpt else 1)  # 2 steps, each forward once more when recomputed for checkpointing
    shapes = len(
        {tuple(m.weight.shape) for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    )
    for opts, single, stacked in (
        ({}, passes * 2 * (7 + 4), 0),  # per layer: 7 weights + 4 distinct inputs (qkv, o, gate/up, down)
        ({"step_weights": True}, passes * 2 * 4, 2 * shapes),  # weights: once per step and weight shape
    ):
        calls = _counted(monkeypatch)
        got = _train(prepare_qat(copy.deepcopy(base), **opts), ids, ckpt=ckpt, autocast=autocast)
        monkeypatch.undo()
        assert calls == [single, stacked], (opts, calls)
        for (y0, g0), (y1, g1) in zip(ref, got, strict=True):
            assert torch.equal(y0, y1), opts
            assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True)), opts


def test_stacked_weight_quantization_equals_per_tensor():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 8, 32, generator=g) * torch.tensor([1.0, 50.0, 1e-3, 0.0])[:, None, None]
    w[0, 3, :16] = 0  # an all-zero block, and w[3] an all-zero tensor
    for dtype in (torch.float32, torch.bfloat16):
        stacked = fakequant.qdq_nvfp4_stacked(w.to(dtype))
        assert stacked.dtype == dtype
        assert all(torch.equal(stacked[i], fakequant.qdq_nvfp4(w[i].to(dtype))) for i in range(4))


def test_step_weights_off_in_eval_and_removed_by_strip():
    m = prepare_qat(tiny_model("llama"), step_weights=True)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        y = m(ids).logits
    lin = m.model.layers[0].self_attn.q_proj
    assert isinstance(lin, QATLinear) and "_step_wq" not in lin.__dict__  # no_grad: nothing held
    m(ids)
    assert "_step_wq" in lin.__dict__
    strip_qat(m)
    assert type(lin) is torch.nn.Linear and "_step_wq" not in lin.__dict__ and not m._forward_pre_hooks
    with torch.no_grad():
        assert not torch.equal(m(ids).logits, y)  # plain BF16 again
