"""Dense BF16/FP16 small-M linear (``dense_linear``): layout and CPU path everywhere, the Hopper kernel on a
GPU. Every check compares against float64 math with fresh random inputs."""

import ctypes
import re

import pytest
import torch

from fp4reason.kernels import cuda as kc
from fp4reason.kernels import dense_linear, gated_rows, tile_dense, untile_dense


def _ref64(x, w, bias=None, gated=False):
    y = x.double() @ w.double().T
    y = y if bias is None else y + bias.double()
    if not gated:
        return y
    gate, up = y.chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------- CPU: layout, fallback, errors


def test_ctypes_signatures_match_the_c_source():
    """Every extern "C" function's parameters (pointer, int or float, in order) are what ctypes passes: a
    missing or extra argument would shift every later one (a GPU run once failed on exactly that)."""
    src = kc._SRC.read_text()
    scalars = {"int": ctypes.c_int, "float": ctypes.c_float}
    found = {}
    for name, params in re.findall(r"^int (fp4r_\w+)\(([^)]*)\)", src, flags=re.M):
        kinds = []
        for param in params.split(","):
            decl = param.split()
            kind = ctypes.c_void_p if "*" in param else scalars.get(decl[0])
            assert kind is not None, f"{name}: unexpected parameter {param.strip()!r}"
            kinds.append(kind)
        found[name] = kinds
    assert set(found) == {"fp4r_nvfp4_gemv", "fp4r_nvfp4_norm_gemv", "fp4r_dense_gemv"}
    for name, kinds in found.items():
        assert kc._SIGNATURES[name] == kinds, name


def test_tile_dense_places_each_element_by_the_lane_formula():
    n, k = 37, 384
    w = torch.arange(n * k, dtype=torch.float32).view(n, k)  # every value names its (row, k)
    t = tile_dense(w)
    assert t.shape == (3, 3, 2, 4, 32, 8)
    cases = [(0, 0, 0, 0, 0, 0, 0), (1, 2, 1, 3, 5, 2, 7), (2, 1, 0, 2, 4, 3, 1)]
    for tile, chunk, h, word, g, lane_t, e in cases:
        row, col = tile * 16 + h * 8 + g, chunk * 128 + lane_t * 32 + word * 8 + e
        assert t[tile, chunk, h, word, g * 4 + lane_t, e].item() == row * k + col
    assert (t[2, :, 1] == 0).all() and (t[2, :, 0, :, 5 * 4 :] == 0).all()  # rows 37..47: zero padding
    assert torch.equal(untile_dense(t, n), w)


def test_tile_dense_rejects_k_not_multiple_of_128():
    with pytest.raises(ValueError, match="K % 128"):
        tile_dense(torch.zeros(16, 200))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_path_matches_float64_both_layouts_and_gated(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 256, generator=g) * 0.05).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(2, 3, 256, generator=g).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    y = dense_linear(x, w, bias)
    assert y.shape == (2, 3, 48) and _rel(y, _ref64(x, w, bias)) < tol
    assert _rel(dense_linear(x, tile_dense(w), bias, n=48), _ref64(x, w, bias)) < tol
    yg = dense_linear(x, w, bias, gated=True)
    assert yg.shape == (2, 3, 24) and _rel(yg, _ref64(x, w, bias, gated=True)) < tol


def test_custom_op_cpu_fallback_takes_gated_bias_in_tile_order():
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(32, 128, generator=g), torch.randn(32, generator=g)
    x = torch.randn(3, 128, generator=g)
    y = torch.ops.fp4reason.dense_linear(x, w, bias[gated_rows(32)], 32, 0, True)
    assert _rel(y, _ref64(x, w, bias, gated=True)) < 1e-5


def test_bad_inputs_raise():
    w = torch.zeros(32, 256)
    with pytest.raises(ValueError, match="K=128"):
        dense_linear(torch.zeros(1, 128), w)
    with pytest.raises(ValueError, match="6-d"):
        dense_linear(torch.zeros(1, 256), w.view(32, 2, 128))
    with pytest.raises(ValueError, match="6-d"):
        dense_linear(torch.zeros(1, 256), tile_dense(w).view(2, 2, 4, 2, 32, 8))
    with pytest.raises(ValueError, match="even number"):
        dense_linear(torch.zeros(1, 256), torch.zeros(31, 256), gated=True)
    with pytest.raises(ValueError, match="16-row tiles"):
        dense_linear(torch.zeros(1, 256), tile_dense(w), n=40)


def test_dense_grid_uses_the_dense_variant(monkeypatch):
    monkeypatch.setattr(kc, "_sm_count", lambda device: 132)
    monkeypatch.setattr(kc, "_dense_variant", 7)
    assert kc.variant_for(1, 4096, dense=True) == 7
    # 16-row CTAs: 256 row blocks >= 132 SMs, so no split; 4096 rows at 64 per CTA would split in two
    assert kc.grid_ctas(1, 4096, 4096, dense=True) == 256
    monkeypatch.setattr(kc, "_dense_variant", 2)
    assert kc.grid_ctas(1, 4096, 4096, dense=True) == 64 * 8


# ---------------------------------------------------------------- GPU: the kernel

SHAPES = {
    "qwen3-8b.qkv": (6144, 4096),
    "qwen3-8b.o": (4096, 4096),
    "qwen3-8b.down": (4096, 12288),
    "llama3.1-8b.down": (4096, 14336),
    "odd": (200, 16 * 8 * 3),
    "n_17": (17, 1024),
}


def _poisoned(fn, m, n, dtype):
    junk = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    del junk
    return fn()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", kc.DENSE_VARIANTS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_dense_kernel_shapes_layouts_variants(monkeypatch, variant, name):
    monkeypatch.setattr(kc, "_dense_variant", variant)
    n, k = SHAPES[name]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    t = tile_dense(w)
    for m in (1, 2, 5, 8, 9, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = _ref64(x, w)
        for ww in (w, t):
            y = _poisoned(lambda: dense_linear(x, ww, n=n), m, n, torch.bfloat16)  # noqa: B023
            assert y.shape == (m, n) and torch.isfinite(y).all(), (name, m, ww.dim())
            assert _rel(y, ref) < 1e-2, (name, m, ww.dim(), _rel(y, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16])
def test_dense_kernel_fp16_bias_and_any_grid(m):
    n, k = 1000, 2048
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for ctas in (0, 16, 37, 200):
        y = dense_linear(x, w, bias, ctas=ctas)
        assert _rel(y, _ref64(x, w, bias)) < 1e-2, (m, ctas)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", kc.DENSE_VARIANTS)
@pytest.mark.parametrize("n,k", [(2 * 12288, 4096), (2 * 14336, 4096), (2 * 136, 512)])
def test_dense_kernel_gated_equals_linear_then_silu(monkeypatch, variant, n, k):
    monkeypatch.setattr(kc, "_dense_variant", variant)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    for m in (1, 4, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = _poisoned(lambda: dense_linear(x, w, bias, gated=True), m, n // 2, torch.bfloat16)  # noqa: B023
        assert y.shape == (m, n // 2) and _rel(y, _ref64(x, w, bias, gated=True)) < 1e-2, (m, n)


@pytest.mark.gpu
def test_dense_kernel_nan_propagates_and_graph_replays():
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(6, 4096, device="cuda", dtype=torch.bfloat16)
    x[2, 100] = float("nan")
    y = dense_linear(x, w)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    dense_linear(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dense_linear(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(y, _ref64(x, w)) < 1e-2
