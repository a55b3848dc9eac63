"""FP4 formats: bytes identical to the compressed-tensors package (its own quantization helpers and
compressors), on random tensors and on the hard cases, and dequantization against a float64 decoder."""

import pytest
import torch

from fp4reason.formats import (
    BLOCK_SIZE,
    MX_BLOCK_SIZE,
    MXFP4Tensor,
    NVFP4Tensor,
    qdq_mxfp4,
    qdq_nvfp4,
    quantize_mxfp4,
    quantize_nvfp4,
)

ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def ct_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict:
    """compressed-tensors' own NVFP4 recipe and packer (what llm-compressor runs per Linear)."""
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    g = ct_helpers.generate_gparam(w.min(), w.max()) if global_scale is None else global_scale
    b = w.unflatten(-1, (-1, 16))
    s, zp = ct_helpers.calculate_qparams(b.amin(-1), b.amax(-1), scheme.weights, global_scale=g)
    sd = {"weight": w, "weight_scale": s, "weight_global_scale": g, "weight_zero_point": zp}
    return NVFP4PackedCompressor.compress(sd, scheme)


def ct_mxfp4(w: torch.Tensor) -> dict:
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    b = w.unflatten(-1, (-1, 32))
    s, zp = ct_helpers.calculate_qparams(b.amin(-1), b.amax(-1), scheme.weights)
    return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": s, "weight_zero_point": zp}, scheme)


def assert_nvfp4_bytes_match(w: torch.Tensor) -> NVFP4Tensor:
    ours, ct = quantize_nvfp4(w), ct_nvfp4(w.clone())
    assert torch.equal(ours.packed, ct["weight_packed"])
    assert torch.equal(ours.block_scale.view(torch.uint8), ct["weight_scale"].view(torch.uint8))
    assert torch.equal(ours.global_scale, ct["weight_global_scale"].reshape(1).float())
    return ours


def assert_mxfp4_bytes_match(w: torch.Tensor) -> MXFP4Tensor:
    ours, ct = quantize_mxfp4(w), ct_mxfp4(w.clone())
    assert torch.equal(ours.packed, ct["weight_packed"])
    assert ct["weight_scale"].dtype == torch.uint8 and torch.equal(ours.scale, ct["weight_scale"])
    return ours


def decode_f64(packed: torch.Tensor) -> torch.Tensor:
    """Plain float64 E2M1 decoder: element 2i in the low nibble, sign in bit 3."""
    table = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
    lo, hi = (packed & 0xF).long(), (packed >> 4).long()
    return torch.stack([table[lo], table[hi]], dim=-1).flatten(-2)


def nvfp4_ref_f64(q: NVFP4Tensor) -> torch.Tensor:
    scale = q.block_scale.double().repeat_interleave(BLOCK_SIZE, dim=-1)
    return decode_f64(q.packed) * scale / q.global_scale.double()


def mxfp4_ref_f64(q: MXFP4Tensor) -> torch.Tensor:
    scale = torch.pow(2.0, q.scale.double() - 127).repeat_interleave(MX_BLOCK_SIZE, dim=-1)
    return decode_f64(q.packed) * scale


def assert_close_f64(x32: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 dequantization = the float64 value up to two float32 roundings (scale/global, then x e2m1)."""
    torch.testing.assert_close(x32.double(), ref, rtol=2.0**-23, atol=1e-40)


# ------------------------------------------------------------------------------------------ NVFP4


@pytest.mark.parametrize("seed", range(4))
def test_nvfp4_random_bytes_match_compressed_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    # rows spanning 6 decades so some blocks hit E4M3 subnormal scales
    w = torch.randn(64, 256, generator=g) * 10 ** (torch.rand(64, 1, generator=g) * 6 - 4)
    q = assert_nvfp4_bytes_match(w)
    assert_close_f64(q.dequantize(torch.float32), nvfp4_ref_f64(q))


def test_nvfp4_hard_cases_bytes_match():
    w = torch.zeros(8, 64)
    w[0, :16] = 6.0 * torch.tensor([1, -1] * 8)  # tensor amax 6 -> global 448 -> block scale 448, step 1
    # exact ties between grid points (step 1): each must round to the even code
    w[1, :16] = torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0]
    )
    w[2, :16] = torch.tensor([0.0, -0.0] * 8)  # +-0 in an all-zero block
    w[2, 16:32] = -0.0
    w[3, :16] = 1e-3 * torch.arange(16)  # tiny amax: E4M3 scale subnormal
    w[3, 16:32] = 1e-6  # tiny amax: E4M3 scale rounds to 0 -> eps
    w[4, :16] = torch.linspace(-3, 3, 16)  # values at +-6 * scale of the block
    w[5] = torch.randn(64)
    w[6, 32:48] = 1e-30  # far below any representable scale
    # 2*7 = row 7 left all-zero
    q = assert_nvfp4_bytes_match(w)
    assert q.global_scale.item() == 448.0
    codes = torch.stack([q.packed[1] & 0xF, q.packed[1] >> 4], -1).flatten()[:16].tolist()
    # ties to even mantissa: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5.0->4.0
    assert codes[:8] == [0, 2, 2, 4, 4, 6, 6, 7]
    assert nvfp4_ref_f64(q)[1, :16].tolist() == [0, 1, 1, 2, 2, 4, 4, 6, -0.0, -1, -1, -2, -2, -4, -4, -6]
    assert_close_f64(q.dequantize(torch.float32), nvfp4_ref_f64(q))


def test_nvfp4_all_zero_and_k16():
    assert_nvfp4_bytes_match(torch.zeros(4, 16))
    q = assert_nvfp4_bytes_match(torch.randn(5, 16))
    assert q.packed.shape == (5, 8) and q.block_scale.shape == (5, 1)


def test_nvfp4_shared_global_scale_bytes_match():
    """Fused q/k/v: one tensor scale over all parts; CT given the same scale writes the same bytes."""
    parts = [torch.randn(32, 64) * s for s in (0.5, 2.0, 1.0)]
    g = quantize_nvfp4(torch.cat(parts)).global_scale
    for p in parts:
        ct = ct_nvfp4(p.clone(), g.clone())
        ours = quantize_nvfp4(p, g)
        assert torch.equal(ours.packed, ct["weight_packed"])
        assert torch.equal(ours.block_scale.view(torch.uint8), ct["weight_scale"].view(torch.uint8))
    fused = NVFP4Tensor.cat([quantize_nvfp4(p, g) for p in parts])
    parts_deq = [quantize_nvfp4(p, g).dequantize(torch.float32) for p in parts]
    assert torch.equal(fused.dequantize(torch.float32), torch.cat(parts_deq))


def test_nvfp4_bf16_weight_matches_ct_on_exact_values():
    """A bf16 weight quantizes like its exact float32 value (CT fed bf16 does its scale arithmetic in bf16,
    a double rounding that ModelOpt and vLLM's reference avoid)."""
    w = (torch.randn(64, 128) * 0.02).bfloat16()
    ours, ct = quantize_nvfp4(w), ct_nvfp4(w.float())
    assert torch.equal(ours.packed, ct["weight_packed"])
    assert torch.equal(ours.block_scale.view(torch.uint8), ct["weight_scale"].view(torch.uint8))


def test_nvfp4_qdq_matches_dequantized_weight():
    x = torch.randn(3, 7, 64)
    flat = x.reshape(-1, 64)
    q = quantize_nvfp4(flat, quantize_nvfp4(flat).global_scale)
    assert torch.equal(qdq_nvfp4(x).reshape(-1, 64), q.dequantize(torch.float32))


def test_nvfp4_errors():
    with pytest.raises(ValueError, match="not divisible by the block size 16"):
        quantize_nvfp4(torch.randn(4, 24))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nvfp4(torch.tensor([[float("nan")] + [0.0] * 15]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nvfp4(torch.randn(16))
    with pytest.raises(ValueError, match="block_scale shape"):
        NVFP4Tensor(
            torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.float8_e4m3fn), torch.ones(1)
        )


# ------------------------------------------------------------------------------------------ MXFP4


@pytest.mark.parametrize("seed", range(4))
def test_mxfp4_random_bytes_match_compressed_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) * 10 ** (torch.rand(64, 1, generator=g) * 8 - 4)
    q = assert_mxfp4_bytes_match(w)
    assert torch.equal(q.dequantize(torch.float32).double(), mxfp4_ref_f64(q))  # powers of two: exact


def test_mxfp4_hard_cases_bytes_match():
    w = torch.zeros(6, 64)
    w[0, :32] = 6.0  # amax 6 -> scale 2^0
    w[1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)
    w[1, 16:32] = -w[1, :16]
    w[1, 31] = 6.0  # block amax 6 (scale 1): the row above are exact ties
    w[2, :32] = torch.tensor([0.0, -0.0] * 16)
    w[3, :32] = 1e-30 * torch.arange(32)
    w[4, :32] = torch.linspace(-7.9, 7.9, 32)  # amax/scale in (6, 8): saturates to 6
    w[5] = torch.randn(64) * 1e3
    q = assert_mxfp4_bytes_match(w)
    assert q.scale[0, 0].item() == 127
    assert mxfp4_ref_f64(q)[1, :8].tolist() == [0, 1, 1, 2, 2, 4, 4, 6]
    assert mxfp4_ref_f64(q)[4].abs().max().item() <= 6 * 2.0 ** (q.scale[4, 0].item() - 127)


def test_mxfp4_k32_and_qdq():
    q = assert_mxfp4_bytes_match(torch.randn(3, 32))
    assert q.scale.shape == (3, 1)
    x = torch.randn(2, 5, 64)
    ref = quantize_mxfp4(x.reshape(-1, 64)).dequantize(torch.float32)
    assert torch.equal(qdq_mxfp4(x).reshape(-1, 64), ref)


def test_mxfp4_errors():
    with pytest.raises(ValueError, match="not divisible by the block size 32"):
        quantize_mxfp4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_mxfp4(torch.full((1, 32), float("inf")))


def test_mxfp4_scale_0xff_decodes_to_nan_in_its_block_only():
    t = quantize_mxfp4(torch.randn(2, 64))
    scale = t.scale.clone()
    scale[1, 0] = 255
    w = MXFP4Tensor(t.packed, scale).dequantize(torch.float32)
    assert torch.isnan(w[1, :32]).all()
    assert torch.isfinite(w[0]).all() and torch.isfinite(w[1, 32:]).all()


def test_e2m1_decode_matches_the_published_table_for_all_16_codes():
    from fp4reason.formats import codes_to_e2m1

    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    got = codes_to_e2m1(torch.arange(16, dtype=torch.uint8))
    assert got.tolist() == table
    assert torch.signbit(got).tolist() == [i >= 8 for i in range(16)]


def test_kv4_matches_a_float64_rendering_and_keeps_zero_tensors_zero():
    """KV4: g = amax / (3.5 * 448), s = e4m3(block_amax / (3.5 g)) * g, x_hat = e1m2(x / s) * s."""
    from fp4reason.formats import qdq_kv4

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 2.0
    x[1, 16:32] = 0  # an all-zero block
    g = x.double().abs().max() / (3.5 * 448)
    blocks = x.double().reshape(3, 4, 16)
    s = (blocks.abs().amax(-1, keepdim=True) / (3.5 * g)).float().to(torch.float8_e4m3fn).double() * g
    grid = torch.arange(8, dtype=torch.float64) * 0.5  # E1M2 magnitudes 0 .. 3.5
    v = (blocks / torch.where(s > 0, s, 1.0)).clamp(-3.5, 3.5)
    nearest = grid[(v.abs().unsqueeze(-1) - grid).abs().argmin(-1)]  # no ties in this random draw
    ref = (torch.sign(v) * nearest * s).reshape(3, 64)
    # float32 vs float64 scale arithmetic: ulp-level; a different grid or e4m3 choice would be >= 6 %
    torch.testing.assert_close(qdq_kv4(x).double(), ref, rtol=1e-6, atol=0)
    zeros = torch.zeros(2, 32)
    assert torch.equal(qdq_kv4(zeros), zeros)  # was 0/0 = NaN everywhere
