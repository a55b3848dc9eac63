"""Triton norm / silu activation kernels (fp4reason.kernels.norm_act) against float64 math and, for the
NVFP4 quantization they fuse, bit for bit against ``formats.qdq_nvfp4``.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set before
triton is imported).
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
from fp4reason.kernels import norm_act  # noqa: E402

if not CUDA and not fq.interpreted():  # imported earlier in this process without the interpreter
    fq = importlib.reload(fq)
    norm_act = importlib.reload(norm_act)
if not CUDA and not fq.interpreted():
    pytest.skip("no CUDA and TRITON_INTERPRET is switched off", allow_module_level=True)

DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = (torch.bfloat16, torch.float16)


def assert_close_ulp(got: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` is ``ref64`` rounded to ``dtype``, up to one unit in the last place (float32 statistics and
    double rounding), and exactly so for nearly every element."""
    ref = ref64.to(dtype)
    ulp = torch.finfo(dtype).eps * ref64.abs().clamp_min(torch.finfo(dtype).tiny)
    err = (got.double() - ref64).abs()
    assert (err <= 1.01 * ulp).all(), f"max error {(err / ulp).max():.2f} ulp"
    assert (got == ref).float().mean() > 0.98


def rms64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    h = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
    return weight.double() * h


def gscale(x: torch.Tensor) -> torch.Tensor:
    return formats.nvfp4_global_scale(x.float().abs().amax()) * 0.9  # some blocks saturate at 448


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_float64(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 2, 16 * 129) * 3).to(dtype).to(DEV)  # 5 programs per row, the last partly masked
    w = (1 + 0.1 * torch.randn(16 * 129)).to(dtype).to(DEV)
    xo, y = norm_act.rms_norm_act(x, None, w, 1e-6)
    assert xo is x and y.shape == x.shape and y.dtype == dtype
    assert_close_ulp(y, rms64(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_norm_and_quant(dtype):
    torch.manual_seed(1)
    x = torch.randn(5, 1, 4096).to(dtype).to(DEV)
    delta = torch.randn(5, 1, 4096).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(4096)).to(dtype).to(DEV)
    xo, y = norm_act.rms_norm_act(x, delta, w, 1e-5)
    assert torch.equal(xo, x + delta)  # one rounding of the exact sum, as torch adds
    assert_close_ulp(y, rms64(xo, w, 1e-5), dtype)
    g = gscale(y)
    xq, yq = norm_act.rms_norm_act(x, delta, w, 1e-5, g)
    assert torch.equal(xq, xo)
    ref = formats.qdq_nvfp4(y, g)
    assert torch.equal(yq.view(torch.int16), ref.view(torch.int16))
    assert (yq != y).any()  # it did quantize


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_and_quant(dtype):
    torch.manual_seed(2)
    inter = 2048 + 96  # two programs per row, the second partly masked
    gu = (torch.randn(3, 2 * inter) * 2).to(dtype).to(DEV)
    a = norm_act.silu_mul_act(gu)
    g64, u64 = gu[:, :inter].double(), gu[:, inter:].double()
    silu = (g64 / (1 + torch.exp(-g64))).to(dtype).double()
    assert_close_ulp(a, silu * u64, dtype)
    g = gscale(a)
    aq = norm_act.silu_mul_act(gu, g)
    assert torch.equal(aq.view(torch.int16), formats.qdq_nvfp4(a, g).view(torch.int16))


def test_bad_input():
    x = torch.randn(2, 64, device=DEV)
    w = torch.ones(64, device=DEV)
    with pytest.raises(TypeError, match="bfloat16/float16"):
        norm_act.rms_norm_act(x, None, w, 1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        norm_act.rms_norm_act(torch.randn(2, 40, device=DEV).bfloat16(), None, w[:40].bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        norm_act.rms_norm_act(x.bfloat16(), None, w[:32].bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="intermediate size"):
        norm_act.silu_mul_act(torch.randn(2, 80, device=DEV).bfloat16())  # I = 40


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_compiled_engine_ops_use_the_kernels():
    """The GPU decode step's W4A4 activation ops are these kernels: same bits as calling them, and the
    quantized activation equals formats.qdq_nvfp4 of the eager torch norm for nearly every element."""
    from fp4reason.engine import model as m

    torch.manual_seed(3)
    x, delta = (torch.randn(4, 1, 4096, device=DEV).bfloat16() for _ in range(2))
    w = (1 + 0.1 * torch.randn(4096, device=DEV)).bfloat16()
    ops = m.Ops(compiled=True)
    xo, h = ops.norm_act(x, delta, w, 1e-6, torch.tensor([50.0], device=DEV))
    xk, hk = norm_act.rms_norm_act(x, delta, w, 1e-6, torch.tensor([50.0], device=DEV))
    assert torch.equal(xo, xk) and torch.equal(h, hk)
    _, plain = m._add_rms_norm(x, delta, w, 1e-6)
    ref = formats.qdq_nvfp4(plain, torch.tensor([50.0], device=DEV))
    assert (h == ref).float().mean() > 0.99
    gu = torch.randn(4, 1, 2 * 12288, device=DEV).bfloat16()
    assert torch.equal(ops.silu_mul_act(gu, torch.tensor([20.0], device=DEV)),
                       norm_act.silu_mul_act(gu, torch.tensor([20.0], device=DEV)))  # fmt: skip
