"""The sort-free top-p / min-p sampler (fp4reason.sampling.nucleus) against float64 references.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (as in test_sampling_triton.py).
"""

import importlib
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fp4reason.sampling import fused as fz  # noqa: E402
from fp4reason.sampling import min_p_mask, top_p_mask  # noqa: E402
from fp4reason.sampling import nucleus as nz  # noqa: E402

if not CUDA and not fz.interpreted():  # imported earlier in this process without the interpreter
    fz = importlib.reload(fz)
    nz = importlib.reload(nz)
if not CUDA and not fz.interpreted():
    pytest.skip("no CUDA and TRITON_INTERPRET is switched off", allow_module_level=True)

DEV = torch.device("cuda" if CUDA else "cpu")


def keep64(x: torch.Tensor, T: torch.Tensor, top_p: float, min_p: float):
    """Float64 nucleus of the float32 scaled logits z = x / T: (kept mask, ascending inclusive cumulative
    probability of every token, per row in sorted order mapped back to token positions)."""
    z = (x.float() / T[:, None]).double()
    if min_p > 0:
        z = z.masked_fill(z < z.max(-1, keepdim=True).values + math.log(min_p), -math.inf)
    p = z.softmax(-1)
    zs, order = z.sort(dim=-1, stable=True)
    cum = torch.empty_like(p).scatter_(1, order, p.gather(1, order).cumsum(-1))
    if top_p >= 1:
        return z > -math.inf, cum
    first = (cum.gather(1, order) > 1 - top_p).float().argmax(-1, keepdim=True)  # first crossing, ascending
    cutoff = zs.gather(1, first)
    return (z >= cutoff) & (z > -math.inf), cum


def assert_cutoff_matches(x, T, top_p, min_p=0.0, block=None, tol=1e-5):
    """The kernel keeps z >= its cutoff; that set equals the float64 nucleus except for tokens whose
    cumulative probability is within ``tol`` of the threshold (float32 sums in another order)."""
    c = nz.top_p_cutoff(x, T, top_p, min_p, block=block)
    z = x.float() / T[:, None]
    kept = (z >= c[:, None]) & (z > -math.inf)
    want, cum = keep64(x, T, top_p, min_p)
    diff = kept != want
    near = (cum - (1 - top_p)).abs() < tol
    assert not (diff & ~near).any(), (diff & ~near).nonzero()[:5].tolist()
    return kept, want


def test_hand_worked_nucleus():
    """p = (0.5, 0.3, 0.15, 0.05): ascending cumulative 0.05, 0.2, 0.5, 1. top_p 0.75 drops the two below
    0.25, 0.9 drops 0.05 only, 0.4 keeps the top token alone, 1 keeps all."""
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().to(DEV)
    T = torch.ones(1, device=DEV)
    for top_p, n in ((0.75, 2), (0.9, 3), (0.4, 1), (1.0, 4)):
        kept, _ = assert_cutoff_matches(x, T, top_p)
        assert kept[0].tolist() == [True] * n + [False] * (4 - n), top_p


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cutoff_against_float64(dtype):
    """Random rows from peaked to flat, temperatures 1e-6..2, several top_p and min_p, a partial last chunk,
    a strided view, -inf masks, ties (a flat row keeps all of it), negative and zero logits."""
    gen = torch.Generator().manual_seed(1)
    B, V = 10, 301
    scale = torch.tensor([0.01, 0.3, 1, 2, 4, 8, 1, 1, 30, 1])[:, None]
    base = torch.randn(B, V + 7, generator=gen) * scale
    base[6, :] = 0.0  # flat: every token tied
    base[7, :150] = 2.0  # two tie groups
    base[7, 150:] = -1.0
    base[8, 20:200] = -torch.inf
    base[9, :] = base[9, :].round()  # many ties among integers, -0 and +0 among them
    base[9, :5] = -0.0
    x = base.to(dtype).to(DEV)[:, :V]
    T = torch.tensor([0.6, 1.0, 0.3, 1.5, 2.0, 1e-6, 0.7, 0.9, 1.0, 0.5], device=DEV)
    for top_p, min_p in (
        (0.95, 0.0),
        (0.5, 0.0),
        (0.9, 0.05),
        (0.999, 0.0),
        (0.05, 0.0),
        (1.0, 0.0),
        (1.0, 0.2),
    ):
        kept, _ = assert_cutoff_matches(x, T, top_p, min_p, block=512 if top_p == 0.95 else 64)
        assert kept[6].all()  # a flat row: ties at the cutoff are kept
        assert kept[7, :150].all() and kept[5].sum() >= 1  # the most likely token always stays


def test_sample_uses_the_torch_path_draws():
    """Given the same generator, the token is the torch path's race argmax over the sorted-nucleus
    probabilities (the same exponential draws q, the same kept set)."""
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(6, 200, generator=gen) * torch.tensor([0.1, 1, 3, 8, 1, 0.5])[:, None]).to(dtype)
        x = x.to(DEV)
        T = torch.tensor([0.6, 1.0, 0.3, 1.5, 1e-6, 2.0], device=DEV)
        for top_p, min_p in ((0.95, 0.0), (0.6, 0.1), (1.0, 0.0)):
            for seed in range(2):
                tok = nz.sample(
                    x, T, top_p, min_p, generator=torch.Generator(DEV).manual_seed(seed), block=64
                )
                probs = top_p_mask(min_p_mask(x.float() / T[:, None], min_p), top_p).softmax(-1)
                q = torch.empty_like(probs).exponential_(generator=torch.Generator(DEV).manual_seed(seed))
                want = probs.div_(q.clamp_(min=1e-30)).argmax(-1)
                assert torch.equal(tok, want), (dtype, top_p, min_p, seed)
                assert tok[4] == x[4].float().argmax()  # T = 1e-6: the argmax


def test_sample_distribution():
    """Frequencies over 500 draws (20000 on a GPU) of one bf16 row at T = 0.8 match the float64 nucleus
    distribution (chi-square; 4 tokens kept of 8, the dropped ones never drawn)."""
    logits = torch.tensor([0.3, 0.25, 0.2, 0.12, 0.07, 0.03, 0.02, 0.01]).log().bfloat16()
    p = (logits.double() / 0.8).softmax(-1)  # ascending cumulative .005 .016 .035 .090 .196 ...
    kept, _ = keep64(logits[None], torch.tensor([0.8]), 0.9, 0.0)
    assert kept[0].tolist() == [True] * 4 + [False] * 4
    n = 20000 if CUDA else 500
    x = logits.repeat(n, 1).to(DEV)
    tok = nz.sample(x, torch.full((n,), 0.8, device=DEV), 0.9, generator=torch.Generator(DEV).manual_seed(0))
    counts = torch.bincount(tok.cpu(), minlength=8).double()
    assert counts[4:].sum() == 0
    expect = p[:4] / p[:4].sum() * n
    chi2 = ((counts[:4] - expect) ** 2 / expect).sum().item()
    assert chi2 < 16.3, (counts.tolist(), expect.tolist())  # 3 dof, p = 0.001


def test_counters_are_left_at_zero():
    """The arrival counters come back zeroed, so one buffer serves every call (and every graph replay): the
    same draws twice give the same tokens, with many chunks per row."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 500, generator=gen) * 2).bfloat16().to(DEV)
    T = torch.tensor([0.5, 1.0, 1.3], device=DEV)
    cnt = nz.counters(3, DEV)
    toks = [nz.sample(x, T, 0.8, generator=torch.Generator(DEV).manual_seed(9), counters=cnt, block=32)]
    assert not cnt.any()
    toks.append(nz.sample(x, T, 0.8, generator=torch.Generator(DEV).manual_seed(9), counters=cnt, block=32))
    assert not cnt.any() and torch.equal(toks[0], toks[1])
    with pytest.raises(ValueError, match="counters"):
        nz.sample(x, T, 0.8, counters=nz.counters(2, DEV))


def test_nan_rows_get_a_valid_token():
    """A NaN row (a broken model) gets a token in range, as torch.argmax gives; other rows are unharmed."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 100, generator=gen)
    x[0, 40] = float("nan")
    x[1, :] = float("nan")
    x = x.to(DEV)
    T = torch.full((3,), 0.7, device=DEV)
    tok = nz.sample(x, T, 0.9, generator=torch.Generator(DEV).manual_seed(1), block=32)
    assert ((tok >= 0) & (tok < 100)).all(), tok
    c = nz.top_p_cutoff(x[2:], T[2:], 0.9, block=32)
    assert torch.isfinite(c).all()


def test_bad_inputs():
    x = torch.randn(3, 40, device=DEV)
    T = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        nz.sample(x[0], T, 0.9)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        nz.sample(x.tolist(), T, 0.9)
    with pytest.raises(ValueError, match="float32"):
        nz.top_p_cutoff(x.double(), T, 0.9)
    with pytest.raises(ValueError, match="top_p"):
        nz.top_p_cutoff(x, T, 0.0)
    with pytest.raises(ValueError, match="min_p"):
        nz.top_p_cutoff(x, T, 0.9, 1.0)
    with pytest.raises(ValueError, match="T_div"):
        nz.top_p_cutoff(x, T[:2], 0.9)
    with pytest.raises(ValueError, match="T_div"):
        nz.top_p_cutoff(x, T.double(), 0.9)
    with pytest.raises(ValueError, match="power of two"):
        nz.top_p_cutoff(x, T, 0.9, block=24)
    with pytest.raises(ValueError, match="non-empty"):
        nz.top_p_cutoff(x[:, :0], T, 0.9)
