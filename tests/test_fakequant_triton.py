"""Triton quantize-dequantize (fp4reason.kernels.fakequant) against the torch formats code, bit for bit.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set before
triton is imported) and are compared with the CPU reference; with CUDA the same tests compare the compiled
kernels with the CUDA reference (where torch divides by a Python scalar through its float32 reciprocal).
"""

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fp4reason import formats  # noqa: E402
from fp4reason.kernels import fakequant as fq  # noqa: E402
from fp4reason.train import fakequant as train_fq  # noqa: E402

if not CUDA and not fq.interpreted():  # imported earlier in this process without the interpreter
    fq = importlib.reload(fq)
if not CUDA and not fq.interpreted():
    pytest.skip("no CUDA and TRITON_INTERPRET is switched off", allow_module_level=True)

DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INF, NAN = float("inf"), float("nan")


def assert_same(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape and dtype, NaN at the same places, every other element the same bits (so -0 != +0)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    gn, rn = got.isnan(), ref.isnan()
    assert torch.equal(gn, rn), f"NaN at {gn.sum()} vs {rn.sum()} places"
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    diff = (got.view(bits) != ref.view(bits)) & ~rn
    if diff.any():
        i = diff.nonzero()[0].tolist()
        raise AssertionError(f"{int(diff.sum())} elements differ, first at {i}: {got[*i]} != {ref[*i]}")


def e4m3_values() -> torch.Tensor:
    """All finite positive float8_e4m3fn values, ascending (float32)."""
    v = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v.sort().values


def tie_amaxes() -> torch.Tensor:
    """Block amaxes 6 * t for every e4m3 rounding tie t (midpoint of neighbours, subnormals up to 448; exact,
    and so is the true division by 6), and the 4 float32 neighbours either side of each."""
    v = e4m3_values()
    out = [(v[:-1] + v[1:]) / 2 * 6]
    up = down = out[0]
    for _ in range(4):
        up, down = up.nextafter(torch.tensor(INF)), down.nextafter(torch.tensor(0.0))
        out += [up, down]
    return torch.cat(out)


def random_blocks(shape, gen, spread: float = 3.0) -> torch.Tensor:
    """Gaussian values whose 16-blocks have log-normally spread magnitudes (deep e4m3 range, subnormals)."""
    *lead, k = shape
    mag = torch.exp(torch.randn(*lead, k // 16, 1, generator=gen) * spread)
    return (torch.randn(*lead, k // 16, 16, generator=gen) * mag).reshape(shape)


def edge_tensor() -> torch.Tensor:
    """[N, 16] blocks of hand-picked values (float32)."""
    grid = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # E2M1 ties at step 1 (amax 6, scale 1)
    rows = [
        grid + [-g for g in grid[1:]] + [-0.0],
        [6.0, -0.2, 0.2, -0.0, 0.0, 1e-40, -1e-40, 5.999, 6.0001, -7.0, 1.4999, 1.5001, 2.4999, 4.9999]
        + [5.0001, 3.0],
        [0.0] * 16,
        [-0.0] * 16,
        [1e-40, -3e-41, 2e-45] + [0.0] * 13,  # float32 subnormals
        [NAN] + [1.0] * 15,
        [INF, 1.0, -2.0] + [0.5] * 13,
        [-INF] + [0.0] * 15,
        [448.0 * 6, 3.0e38, -3.0e38] + [1.0] * 13,
        [65504.0, -65504.0, 65000.0] + [60000.0] * 13,  # float16 max: the product may round past it
    ]
    fractions = (0.5, 0.25, -0.75, 0.9, 1 / 3, 0.1, -1.0)
    rows += [[a] + [a * f for f in fractions] * 2 + [0.0] for a in tie_amaxes()]
    return torch.tensor([r[:16] for r in rows], dtype=torch.float32)


def cases(gen):
    """(name, float32 tensor) pairs covering random data and edge values."""
    e = edge_tensor()
    finite = e[torch.isfinite(e).all(-1) & (e.abs().amax(-1) < 1e5)]
    return [
        ("random2d", random_blocks((8, 64), gen)),
        ("random3d", random_blocks((2, 3, 48), gen, spread=8.0)),
        ("random1d", random_blocks((32,), gen)),
        ("edges_finite", finite),
        ("edges_all", e),
        ("zeros", torch.zeros(4, 32)),
        ("neg_zeros", torch.full((2, 16), -0.0)),
        ("subnormal_only", torch.tensor([[1e-40, -2e-41] + [0.0] * 14])),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_dynamic_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    for name, x in cases(gen):
        x = x.to(DEV, dtype)
        assert_same(fq.qdq_nvfp4(x), formats.qdq_nvfp4(x)), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_static_scale_matches_reference(dtype):
    """Static tensor scales: 1 (scale = amax/6 exactly: every e4m3 tie), clamped at 448, and odd ones."""
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([edge_tensor(), random_blocks((4, 16), gen)]).to(DEV, dtype)
    # 1/(1 + 2^-8), 1/(1 + 2^-11): step = 1/g lands on a bfloat16 / float16 rounding tie, so the
    # E2M1 powers of two times it test the output cast's ties-to-even
    scales = [1.0, 1e6, 3.7, 2688 / 7.3, 1e-30, 0.0, -2.5, INF, NAN, 1 / (1 + 2**-8), 1 / (1 + 2**-11)]
    for s in scales:
        g = torch.tensor([s], device=DEV)
        assert_same(fq.qdq_nvfp4(x, g), formats.qdq_nvfp4(x, g)), s
    g64 = torch.tensor(0.1, dtype=torch.float64)  # 0-dim float64 on the CPU: cast and moved as torch does
    assert_same(fq.qdq_nvfp4(x, g64), formats.qdq_nvfp4(x, g64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv4_matches_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    for name, x in cases(gen)[:5] + [("kv_heads", random_blocks((1, 2, 7, 32), gen))]:
        x = x.to(DEV, dtype)
        assert_same(fq.qdq_kv4(x), formats.qdq_kv4(x)), name
    x = torch.randn(3, 32, generator=gen)
    x[1, :16] = 0  # an all-zero block (scale 0: x * 0.0 keeps the signs of zeros)
    x[2, 16:] = -torch.rand(16, generator=gen) * 1e-12  # a block whose e4m3 scale underflows to 0
    for dtype in DTYPES:
        assert_same(fq.qdq_kv4(x.to(DEV, dtype)), formats.qdq_kv4(x.to(DEV, dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    w = random_blocks((5, 4, 32), gen) * torch.tensor([1.0, 50.0, 1e-3, 0.0, 1.0])[:, None, None]
    w[0, 3, :16] = 0
    w[4, 1, 5] = NAN  # one group's amax is NaN: its scale becomes 1, the others are unaffected
    w = w.to(DEV, dtype)
    got = fq.qdq_nvfp4_stacked(w)
    assert_same(got, train_fq.qdq_nvfp4_stacked(w))
    for i in range(5):
        assert_same(got[i], formats.qdq_nvfp4(w[i]))


def test_non_contiguous_and_shapes():
    gen = torch.Generator().manual_seed(4)
    x = random_blocks((32, 48), gen).to(DEV).t()[:, :16]  # [48, 16] view with strides (1, 48)
    assert not x.is_contiguous()
    assert_same(fq.qdq_nvfp4(x), formats.qdq_nvfp4(x))
    assert_same(fq.qdq_kv4(x), formats.qdq_kv4(x))
    w = random_blocks((3, 32, 16), gen).to(DEV).transpose(0, 1)  # [32, 3, 16] -> stacked [32, 3, 16]
    assert_same(fq.qdq_nvfp4_stacked(w), train_fq.qdq_nvfp4_stacked(w))
    big = random_blocks((3, 5000 * 16), gen).to(DEV)  # several amax programs, a ragged last tile
    assert_same(fq.qdq_nvfp4(big), formats.qdq_nvfp4(big))


def test_tie_set_separates_cpu_and_cuda_division():
    """The edge amaxes include values where torch's CUDA division by 6 (times float32 1/6) and the CPU's true
    division give different e4m3 scales, so the same tests on a GPU check the device-specific path."""
    a = tie_amaxes()
    true_div = (a / 6).to(torch.float8_e4m3fn).float()
    recip = (a * (torch.tensor(1.0) / 6)).to(torch.float8_e4m3fn).float()
    assert (true_div != recip).sum() >= 3
    e = e4m3_values()
    assert e[0] == 2.0**-9 and e[-1] == 448 and len(e) == 126


def test_bad_input():
    with pytest.raises(ValueError, match="not divisible by the block size 16"):
        fq.qdq_nvfp4(torch.zeros(4, 24, device=DEV))
    with pytest.raises(ValueError, match="not divisible"):
        fq.qdq_kv4(torch.zeros(2, 8, device=DEV))
    with pytest.raises(ValueError, match=r"\[G, N, K\]"):
        fq.qdq_nvfp4_stacked(torch.zeros(4, 32, device=DEV))
    with pytest.raises(TypeError, match="floating-point"):
        fq.qdq_nvfp4(torch.zeros(4, 16, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        fq.qdq_nvfp4(torch.zeros(4, 16, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match="empty"):
        fq.qdq_nvfp4(torch.zeros(0, 16, device=DEV))
    assert fq.qdq_nvfp4(torch.zeros(0, 16, device=DEV), torch.ones(1)).shape == (0, 16)
    assert fq.qdq_nvfp4_stacked(torch.zeros(0, 4, 16, device=DEV)).shape == (0, 4, 16)


def test_train_backend_selection():
    """``compile_fake_quant("triton")`` routes QAT through these kernels with the same numbers; booleans keep
    the torch path for CPU tensors."""
    gen = torch.Generator().manual_seed(5)
    x = random_blocks((4, 32), gen).to(DEV).requires_grad_()
    try:
        train_fq.compile_fake_quant("triton")
        assert train_fq._QDQ["nvfp4"] is fq.qdq_nvfp4
        y = train_fq.fq_nvfp4(x)
        y.backward(torch.ones_like(y))
        assert_same(y.detach(), formats.qdq_nvfp4(x.detach()))
        assert torch.equal(x.grad, torch.ones_like(x))  # straight-through
        train_fq.compile_fake_quant(False)
        assert train_fq._QDQ["nvfp4"](x.detach().cpu()) is not None
        assert train_fq.backend_for(torch.device("cpu")) == "eager"
        assert train_fq.backend_for("cuda") == "triton"  # triton imports here: the CUDA default
        with pytest.raises(ValueError, match="backend"):
            train_fq.compile_fake_quant("fast")
    finally:
        train_fq.compile_fake_quant(False)


@pytest.mark.parametrize("step_weights", [False, True])
def test_qat_model_step_identical_to_eager(step_weights):
    """A tiny W4A4KV4 QAT model: logits and every gradient the same with the Triton and the eager backend."""
    from conftest import tiny_model

    from fp4reason.train.fakequant import prepare_qat

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(8)).to(DEV)
    out = []
    try:
        for backend in ("eager", "triton"):
            train_fq.compile_fake_quant(backend)
            model = prepare_qat(tiny_model("qwen3").to(DEV), step_weights=step_weights).train()
            logits = model(ids, use_cache=False).logits
            logits.float().logsumexp(-1).mean().backward()
            out.append([logits.detach()] + [p.grad for p in model.parameters()])
    finally:
        train_fq.compile_fake_quant(False)
    for a, b in zip(*out, strict=True):
        assert_same(a, b)


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gpu_large_tensors(dtype):
    gen = torch.Generator().manual_seed(6)
    x = random_blocks((2048, 3072), gen, spread=2.0).to(DEV, dtype)
    assert_same(fq.qdq_nvfp4(x), formats.qdq_nvfp4(x))
    assert_same(fq.qdq_kv4(x.view(1, 2048, 24, 128)), formats.qdq_kv4(x.view(1, 2048, 24, 128)))
    w = random_blocks((28, 1024, 2048), gen, spread=1.0).to(DEV, dtype)
    assert_same(fq.qdq_nvfp4_stacked(w), train_fq.qdq_nvfp4_stacked(w))


@pytest.mark.gpu
def test_gpu_graph_capture_no_host_sync():
    """All three run inside CUDA-graph capture (a host sync would abort it) and replay on new data."""
    gen = torch.Generator().manual_seed(7)
    x = random_blocks((256, 1024), gen).to(DEV, torch.bfloat16)
    w = random_blocks((4, 256, 512), gen).to(DEV)
    g = torch.tensor([7.5], device=DEV)
    fns = (fq.qdq_nvfp4, fq.qdq_kv4, lambda t: fq.qdq_nvfp4(t, g))
    for f in fns:  # compile outside the capture
        f(x)
    fq.qdq_nvfp4_stacked(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [f(x) for f in fns] + [fq.qdq_nvfp4_stacked(w)]
    x.copy_(random_blocks((256, 1024), gen).to(DEV, torch.bfloat16))
    w.copy_(random_blocks((4, 256, 512), gen).to(DEV))
    graph.replay()
    refs = [formats.qdq_nvfp4(x), formats.qdq_kv4(x), formats.qdq_nvfp4(x, g), train_fq.qdq_nvfp4_stacked(w)]
    for got, ref in zip(outs, refs, strict=True):
        assert_same(got, ref)
