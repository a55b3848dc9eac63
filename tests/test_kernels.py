"""NVFP4 linear: the CPU reference path and dispatch everywhere, the Hopper kernel on a GPU.

Every check compares against float64 math on the dequantized weight with fresh random inputs."""

import random

import pytest
import torch

from fp4reason.formats import NVFP4Tensor, qdq_nvfp4, quantize_nvfp4
from fp4reason.kernels import (
    TiledNVFP4,
    gated_rows,
    nvfp4_linear,
    nvfp4_linear_reference,
    nvfp4_norm_linear,
    nvfp4_silu_mul,
    prepare_nvfp4,
    tile_nvfp4,
    untile_nvfp4,
)
from fp4reason.kernels.cuda import WORD_MAG_LO, WORD_SIGN, _word_bytes


def _ref64(x: torch.Tensor, w: NVFP4Tensor, bias=None) -> torch.Tensor:
    y = x.double() @ w.dequantize(torch.float32).double().T.to(x.device)
    return y if bias is None else y + bias.double()


def _silu_mul64(x: torch.Tensor, w: NVFP4Tensor, bias=None) -> torch.Tensor:
    """float64 silu(gate) * up of a fused [gate; up] weight, written out: gate * sigmoid(gate) * up."""
    gate, up = _ref64(x, w, bias).chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def _norm64(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 RMSNorm of h times the weight, without any rounding in between."""
    hd = h.double()
    return hd / torch.sqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------- CPU: reference path and dispatch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    w = quantize_nvfp4(torch.randn(48, 96, generator=g))
    x = torch.randn(5, 96, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    y = nvfp4_linear(x, w, bias)
    assert y.dtype == dtype and y.shape == (5, 48)
    assert _rel(y, _ref64(x, w, bias)) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_cpu_dispatch_is_reference_and_keeps_leading_dims():
    w = quantize_nvfp4(torch.randn(32, 64))
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    assert torch.equal(nvfp4_linear(x, w), nvfp4_linear_reference(x, w))
    assert nvfp4_linear(x, w).shape == (2, 3, 32)


def test_act_quant_is_qdq_then_linear():
    w = quantize_nvfp4(torch.randn(16, 64))
    x = torch.randn(4, 64) * 3
    gs = torch.tensor([448 * 6 / 10.0])
    y = nvfp4_linear(x, w, act_quant=True, input_global_scale=gs)
    assert _rel(y, _ref64(qdq_nvfp4(x, gs), w)) < 1e-5
    assert not torch.allclose(y, nvfp4_linear(x, w))  # quantizing the input changes the result


def test_custom_op_cpu_fallback_and_fake():
    w = quantize_nvfp4(torch.randn(24, 128))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    t = prepare_nvfp4(w)
    y = torch.ops.fp4reason.nvfp4_linear(x, t.tiled, t.global_scale, None, 24, 0, False)
    assert torch.equal(y, nvfp4_linear_reference(x, w))
    torch.library.opcheck(
        torch.ops.fp4reason.nvfp4_linear,
        (x, t.tiled, t.global_scale, None, 24, 0, False),
        test_utils=("test_faketensor",),  # test_schema cannot multiply fp8 on CPU
    )
    w2 = quantize_nvfp4(torch.randn(32, 128))  # gated: [M, N/2] = silu(gate) * up, bias in gated row order
    bias = torch.randn(32, dtype=torch.bfloat16)
    tg = prepare_nvfp4(w2, gated=True)
    yg = torch.ops.fp4reason.nvfp4_linear(x, tg.tiled, tg.global_scale, bias[gated_rows(32)], 32, 0, True)
    assert torch.equal(yg, nvfp4_silu_mul(x, w2, bias))
    torch.library.opcheck(
        torch.ops.fp4reason.nvfp4_linear,
        (x, tg.tiled, tg.global_scale, None, 32, 0, True),
        test_utils=("test_faketensor",),
    )


def test_bad_inputs_raise():
    w = quantize_nvfp4(torch.randn(16, 64))
    with pytest.raises(ValueError, match="K=64"):
        nvfp4_linear(torch.randn(2, 48), w)
    with pytest.raises(TypeError, match="bf16"):
        nvfp4_linear(torch.randn(2, 64).to(torch.int32), w)
    with pytest.raises(ValueError, match="block size"):
        quantize_nvfp4(torch.randn(4, 40))


def test_nan_input_propagates_on_reference():
    w = quantize_nvfp4(torch.randn(16, 64))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    x[1, 7] = float("nan")
    y = nvfp4_linear(x, w)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_tiled_layout_is_a_byte_permutation():
    n, k = 37, 384
    w = quantize_nvfp4(torch.randn(n, k))
    t = prepare_nvfp4(w)
    assert isinstance(t, TiledNVFP4) and t.shape == (n, k) and t.tiled.shape == (3, 3, 1152)
    packed, scale = untile_nvfp4(t.tiled, n)
    sb = w.block_scale.view(torch.uint8)
    assert torch.equal(packed, w.packed) and torch.equal(scale.view(torch.uint8), sb)
    for row in range(n):  # the documented lane order, element by element
        tile, rr = divmod(row, 16)
        h, g = divmod(rr, 8)
        for c in range(k // 128):
            for word in range(16):  # lane tt holds words 4tt..4tt+3 of the row's chunk, bits permuted
                tt, j = divmod(word, 4)
                at = h * 512 + (g * 4 + tt) * 16 + 4 * j
                got = int.from_bytes(bytes(t.tiled[tile, c, at : at + 4].tolist()), "little")
                src = int.from_bytes(
                    bytes(w.packed[row, c * 64 + 4 * word : c * 64 + 4 * word + 4].tolist()), "little"
                )
                for e in range(8):  # element e: magnitude bits and sign where WORD_MAG_LO / WORD_SIGN say
                    assert (got >> WORD_MAG_LO[e]) & 7 == (src >> 4 * e) & 7
                    assert (got >> WORD_SIGN[e]) & 1 == (src >> 4 * e + 3) & 1
            for blk in range(8):  # lane g*4 + blk//2 holds the scales of its own nibbles' blocks
                tt, jj = divmod(blk, 2)
                assert t.tiled[tile, c, 1024 + (g * 4 + tt) * 4 + h * 2 + jj] == sb[row, c * 8 + blk]
    pad_packed, pad_scale = untile_nvfp4(t.tiled, 48)
    assert not pad_packed[n:].any() and not pad_scale[n:].view(torch.uint8).any()  # padding rows are zero
    x = torch.randn(3, k, dtype=torch.bfloat16)
    assert torch.equal(nvfp4_linear(x, t), nvfp4_linear_reference(x, w))


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("bf16", [True, False])
def test_kernel_word_decode_matches_e2m1(bf16):
    """The CUDA kernel's decode_word, operation for operation on uint32 (csrc/nvfp4_gemv.cu), applied to
    words in the tiled bit layout, gives pairs (k0,k1) .. (k6,k7) equal to the E2M1 values times 2^-126
    (bf16) or 2^-14 (fp16) for every code."""
    m32 = 0xFFFFFFFF
    s_ = 0x80008000
    if bf16:
        m_ = 0x01C001C0
        ops = [
            lambda q: q & (s_ | m_),
            lambda q: (q << 6) & (s_ | m_),
            lambda q: ((q << 3) & m_) | ((q << 2) & s_),
            lambda q: ((q >> 4) & m_) | ((q << 1) & s_),
        ]
    else:
        m_ = 0x0E000E00
        ops = [
            lambda q: ((q << 3) & m_) | (q & s_),
            lambda q: ((q << 9) & m_) | ((q << 6) & s_),
            lambda q: ((q << 6) & m_) | ((q << 2) & s_),
            lambda q: ((q >> 1) & m_) | ((q << 1) & s_),
        ]
    dtype, unit = (torch.bfloat16, 2.0**-126) if bf16 else (torch.float16, 2.0**-14)
    rng = random.Random(0)
    words = [rng.getrandbits(32) for _ in range(2000)] + [0x76543210, 0xFEDCBA98, 0, m32]
    packed = torch.tensor([list(wd.to_bytes(4, "little")) for wd in words], dtype=torch.uint8)
    permuted = _word_bytes(packed)
    for wd, pb in zip(words, permuted.tolist(), strict=True):
        q = int.from_bytes(bytes(pb), "little")
        for i, op in enumerate(ops):
            pair = op(q) & m32
            halves = torch.tensor([pair & 0xFFFF, pair >> 16], dtype=torch.int32).to(torch.int16)
            got = halves.view(dtype).double()
            for e, v in zip((2 * i, 2 * i + 1), got.tolist(), strict=True):
                code = (wd >> 4 * e) & 0xF
                want = (-1.0 if code & 8 else 1.0) * E2M1[code & 7] * unit
                assert v == want or (want == 0.0 and v == 0.0), (hex(wd), i, e, v, want)


def test_gated_rows_interleave_gate_and_up_by_eight():
    want = [*range(0, 8), *range(16, 24), *range(8, 16), *range(24, 32)]  # I = 16: gate 0..15, up 16..31
    assert gated_rows(32).tolist() == want
    with pytest.raises(ValueError, match="N % 16"):
        gated_rows(24)


def test_gated_tiling_round_trips_and_dequantizes_in_original_order():
    n, k = 48, 256
    w = quantize_nvfp4(torch.randn(n, k))
    t = prepare_nvfp4(w, gated=True)
    assert isinstance(t, TiledNVFP4) and t.gated and t.shape == (n, k)
    plain = tile_nvfp4(w.packed, w.block_scale)
    rows = gated_rows(n)
    for tile in range(n // 16):  # tile j of the gated layout is the plain tiling of rows rows[16j:16j+16]
        r = rows[16 * tile : 16 * tile + 16]
        sub = tile_nvfp4(w.packed[r], w.block_scale[r])
        assert torch.equal(t.tiled[tile], sub[0])
    assert not torch.equal(t.tiled, plain)
    packed, scale = untile_nvfp4(t.tiled, n, gated=True)
    assert torch.equal(packed, w.packed)
    assert torch.equal(scale.view(torch.uint8), w.block_scale.view(torch.uint8))
    assert torch.equal(t.dequantize(torch.float32), w.dequantize(torch.float32))
    with pytest.raises(ValueError, match="gated=True"):
        prepare_nvfp4(t)
    with pytest.raises(ValueError, match="N % 16"):
        prepare_nvfp4(quantize_nvfp4(torch.randn(40, k)), gated=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_reference_matches_float64(dtype):
    n, k = 96, 256
    w = quantize_nvfp4(torch.randn(n, k) * 0.1)
    x = torch.randn(2, 3, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = nvfp4_silu_mul(x, w, bias)
    assert y.shape == (2, 3, n // 2) and y.dtype == dtype
    assert _rel(y, _silu_mul64(x, w, bias)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(nvfp4_silu_mul(x, prepare_nvfp4(w, gated=True), bias), y)  # the tiled weight too
    with pytest.raises(ValueError, match="even number of rows"):
        nvfp4_silu_mul(x, quantize_nvfp4(torch.randn(95, k)))


def test_prepare_leaves_k_not_multiple_of_128():
    w = quantize_nvfp4(torch.randn(16, 16 * 9))
    assert prepare_nvfp4(w) is w
    with pytest.raises(ValueError, match="K % 128"):
        tile_nvfp4(w.packed, w.block_scale)


def test_split_and_variant_dispatch(monkeypatch):
    from fp4reason.kernels import cuda as fk

    monkeypatch.setattr(fk, "_sm_count", lambda device: 132)
    monkeypatch.setattr(fk, "_variant", None)
    assert fk.variant_for(1) == fk.variant_for(16) == fk.variant_for(16, 28672) == 4  # 448 > 3 x 132
    assert fk.variant_for(1, 24576) == fk.variant_for(8, 28672) == 9  # >= 264 row blocks of 64 at M <= 8
    assert fk.variant_for(16, 24576) == 9  # 384 row blocks: one wave at 3 CTAs per SM
    assert fk.variant_for(16, 24576, gated=True) == 4 and fk.variant_for(8, 24576, gated=True) == 9
    assert fk.variant_for(1, 16000) == 4  # 250 row blocks of 64
    assert fk._ROWS_PER_CTA[0] == fk._ROWS_PER_CTA[4] == 128
    # worked by hand (132 SMs, 128-row CTAs; split only below one CTA per SM, then <= 528 CTAs, >= 4 chunks)
    assert fk.split_count(1, 28672, 4096) == 1  # 224 row blocks >= 132
    assert fk.split_count(16, 24576, 4096) == 1  # 192
    assert fk.split_count(1, 6144, 4096) == 8  # 48 -> 384 CTAs, 4 chunks each
    assert fk.split_count(1, 4096, 4096) == 8  # 32 -> 256 (16 would leave 2 chunks per split)
    assert fk.split_count(1, 4096, 14336) == 16  # 32 -> 512 CTAs of 7 chunks
    assert fk.split_count(1, 72, 256) == 1  # 2 chunks: too few to split
    assert fk.split_count(1, 200000, 128) == 1


def test_stream_k_grid(monkeypatch):
    from fp4reason.kernels import cuda as fk

    monkeypatch.setattr(fk, "_sm_count", lambda device: 132)
    monkeypatch.setattr(fk, "_variant", 4)
    monkeypatch.setattr(fk, "_ctas_per_sm", 4)
    # worked by hand: 128-row CTAs, units = row blocks x 128-k chunks, min(4 x 132, units // 4) CTAs
    assert fk.grid_ctas(1, 28672, 4096) == 528  # 224 x 32 units: 13.6 each (whole row blocks: 224 CTAs)
    assert fk.grid_ctas(16, 24576, 4096) == 528  # 192 x 32
    assert fk.grid_ctas(1, 4096, 4096) == 256  # 32 x 32 = 1024 units, >= 4 each
    assert fk.grid_ctas(1, 6144, 4096) == 384  # 48 x 32
    assert fk.grid_ctas(1, 4096, 14336) == 528  # 32 x 112
    assert fk.grid_ctas(1, 72, 256) == 1  # 1 x 2 units
    assert fk.grid_ctas(1, 4096, 4096, splits=8) == 256  # classic split-K: row blocks x splits
    assert fk.grid_ctas(1, 4096, 4096, splits=64) == 32 * 32  # at most one split per chunk
    monkeypatch.setattr(fk, "_ctas_per_sm", 0)  # the split-K policy
    assert fk.grid_ctas(1, 28672, 4096) == 224
    assert fk.grid_ctas(1, 6144, 4096) == 384
    monkeypatch.setattr(fk, "_ctas_per_sm", None)  # default: split-K up to M = 8, stream-K above
    assert fk.grid_ctas(8, 6144, 4096) == 384 and fk.grid_ctas(9, 24576, 4096) == 528
    monkeypatch.setattr(fk, "_variant", None)  # and variant 9 (64-row CTAs) for wide N at M <= 8
    assert fk.grid_ctas(8, 24576, 4096) == 384 and fk.grid_ctas(1, 28672, 4096) == 448
    assert fk.grid_ctas(16, 24576, 4096) == 384 and fk.grid_ctas(16, 28672, 4096) == 528


def test_activation_staging_dispatch(monkeypatch):
    """XF (variants 10 / 11): the staged bytes worked by hand, the move 4 -> 10 / 9 -> 11 under the size
    limit, nothing when it is off, and a forced XF variant that would not fit falls back."""
    from fp4reason.kernels import cuda as fk

    # Llama gate_up at M = 1, variant 9: 448 whole row blocks of 64 rows, 32 chunks each: 32 x 256 B
    assert fk.staged_bytes(1, 28672, 4096, 448, 64) == 32 * 256
    # down (4096 x 14336) at M = 4 on 512 CTAs of 128 rows: 32 x 112 units -> 7 chunks x 4 rows x 256 B
    assert fk.staged_bytes(4, 4096, 14336, 512, 128) == 7 * 4 * 256
    assert fk.staged_bytes(2, 1000, 2048, 1, 128) == 16 * 2 * 256  # one CTA: at most a row block's 16 chunks
    assert fk.staged_bytes(1, 1000, 2048, 10_000, 128) == 256  # more CTAs than units: one chunk
    monkeypatch.setattr(fk, "_xf_kb", 0)
    assert fk.with_staging(9, 1, 28672, 4096, 448) == 9 and fk.with_staging(4, 1, 4096, 4096, 256) == 4
    monkeypatch.setattr(fk, "_xf_kb", 16)
    assert fk.with_staging(9, 1, 28672, 4096, 448) == 11 and fk.with_staging(9, 2, 28672, 4096, 448) == 11
    assert fk.with_staging(9, 3, 28672, 4096, 448) == 9  # 24 KB
    assert fk.with_staging(4, 16, 4096, 4096, 256) == 10  # 4 chunks x 16 rows = 16 KB
    assert fk.with_staging(7, 1, 4096, 4096, 256) == 7  # no XF form
    assert fk.with_staging(10, 16, 4096, 14336, 32) == 4  # a whole 112-chunk row block: 448 KB
    assert fk.with_staging(11, 4, 28672, 4096, 448) == 11  # forced, 32 KB: fits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_linear_reference_matches_float64(dtype):
    """``nvfp4_norm_linear`` off the GPU: h = x + delta as torch adds, the projection of RMSNorm(h) against
    float64 (plain and gated, delta or none), leading dims kept."""
    g = torch.Generator().manual_seed(3)
    w = quantize_nvfp4(torch.randn(96, 256, generator=g) * 0.05)
    x = (torch.randn(2, 3, 256, generator=g) * 2).to(dtype)
    delta = torch.randn(2, 3, 256, generator=g).to(dtype)
    nw = (1 + 0.2 * torch.randn(256, generator=g)).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    y, h = nvfp4_norm_linear(x, nw, 1e-6, w, delta=delta)
    assert torch.equal(h, x + delta) and y.shape == (2, 3, 96)
    assert _rel(y, _ref64(_norm64(h, nw, 1e-6), w)) < tol
    y0, h0 = nvfp4_norm_linear(x, nw, 1e-6, w)
    assert torch.equal(h0, x) and _rel(y0, _ref64(_norm64(x, nw, 1e-6), w)) < tol
    yg, _ = nvfp4_norm_linear(x, nw, 1e-6, w, delta=delta, gated=True)
    assert yg.shape == (2, 3, 48) and _rel(yg, _silu_mul64(_norm64(h, nw, 1e-6), w)) < tol


def test_norm_linear_custom_op_cpu_fallback_and_fake():
    """The op's fallback: h a fresh tensor (also without delta), y the projection of RMSNorm(h)."""
    w = quantize_nvfp4(torch.randn(24, 128))
    t = prepare_nvfp4(w)
    x, delta = torch.randn(3, 128, dtype=torch.bfloat16), torch.randn(3, 128, dtype=torch.bfloat16)
    nw = torch.rand(128, dtype=torch.bfloat16) + 0.5
    op = torch.ops.fp4reason.nvfp4_norm_linear
    y, h = op(x, delta, nw, 1e-5, t.tiled, t.global_scale, None, 24, 0, False)
    assert torch.equal(h, x + delta) and _rel(y, _ref64(_norm64(h, nw, 1e-5), w)) < 1e-2
    y0, h0 = op(x, None, nw, 1e-5, t.tiled, t.global_scale, None, 24, 0, False)
    assert torch.equal(h0, x) and h0.data_ptr() != x.data_ptr()
    for d in (delta, None):
        torch.library.opcheck(
            op, (x, d, nw, 1e-5, t.tiled, t.global_scale, None, 24, 0, False), test_utils=("test_faketensor",)
        )


def test_norm_linear_bad_inputs_raise():
    w = quantize_nvfp4(torch.randn(16, 64))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="delta must match"):
        nvfp4_norm_linear(x, torch.ones(64), 1e-6, w, delta=torch.randn(3, 64))
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        nvfp4_norm_linear(x, torch.ones(32), 1e-6, w)
    with pytest.raises(ValueError, match="K=64"):
        nvfp4_norm_linear(torch.randn(2, 48), torch.ones(48), 1e-6, w)


def test_norm_staging_dispatch(monkeypatch):
    """NORM (variants 12 / 13): the staged bytes worked by hand (rows + norm weight + 4 x 16 sums + 16 rstd),
    the move from 4 / 9 (and their XF forms) to 12 / 13, none for other variants or past the size limit."""
    from fp4reason.kernels import cuda as fk

    assert fk.norm_staged_bytes(1, 4096) == 8192 + 8192 + 320
    assert fk.norm_staged_bytes(4, 5120) == 4 * 10240 + 10240 + 320
    assert [fk.norm_variant(v, 1, 4096) for v in (4, 9, 10, 11)] == [12, 13, 12, 13]
    assert fk.norm_variant(2, 1, 4096) is None and fk.norm_variant(7, 1, 4096) is None
    assert fk.norm_variant(9, 16, 4096) == 13  # 136 KB
    assert fk.norm_variant(9, 16, 5120) is None  # 170 KB > 160


# ---------------------------------------------------------------- GPU: the Hopper kernel

SHAPES = {  # (N, K)
    "qwen3-8b.qkv": (6144, 4096),
    "qwen3-8b.o": (4096, 4096),
    "qwen3-8b.gate_up": (24576, 4096),
    "qwen3-8b.down": (4096, 12288),
    "llama3.1-8b.gate_up": (28672, 4096),
    "llama3.1-8b.down": (4096, 14336),
    "qwen3-32b.qkv": (10240, 5120),
    "qwen3-32b.o": (5120, 8192),
    "qwen3-32b.gate_up": (51200, 5120),
    "qwen3-32b.down": (5120, 25600),
    "odd_n": (1000, 2048),
    "odd_n_small": (72, 256),
    "k_16_odd": (96, 16 * 129),
    "k_not_128": (200, 16 * 6),
}


def _gpu_weight(n, k, scale=0.02, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return quantize_nvfp4(torch.randn(n, k, device="cuda", generator=g) * scale)


def _poisoned_call(fn, m, n, dtype):
    """Fill the caching allocator's next [m, n] block with NaN, so unwritten outputs show up."""
    junk = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    del junk
    return fn()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SHAPES))
def test_kernel_shapes(name):
    n, k = SHAPES[name]
    w = prepare_nvfp4(_gpu_weight(n, k))
    for m in (1, 2, 3, 5, 8, 9, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = _poisoned_call(lambda: nvfp4_linear(x, w), m, n, torch.bfloat16)  # noqa: B023
        assert y.shape == (m, n) and torch.isfinite(y).all(), (name, m)
        err = _rel(y, _ref64(x, w))
        assert err < 1e-2, (name, m, err)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 7, 12, 16])
def test_kernel_fp16_bias_and_splits(m):
    from fp4reason.kernels.cuda import nvfp4_linear_cuda

    n, k = 2304, 3072
    w = prepare_nvfp4(_gpu_weight(n, k, seed=m))
    x = torch.randn(2, m, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    ref = _ref64(x, w, bias)
    for splits in (1, 3, 24):
        y = _poisoned_call(lambda: nvfp4_linear_cuda(x, w, bias, splits=splits), 2 * m, n, torch.float16)  # noqa: B023
        assert y.shape == (2, m, n) and _rel(y, ref) < 1e-2, (m, splits)
    from fp4reason.kernels.cuda import _workspaces

    for work, counters in _workspaces.values():  # left clean for the next call
        assert not work.any() and not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(range(12)))
def test_kernel_every_variant(monkeypatch, variant):
    """Each compiled variant (row tiles, stages, activations via registers or a shared ring), both dtypes,
    with and without split-K, every M, an N that is not a multiple of the CTA rows."""
    from fp4reason.kernels import cuda as fk

    monkeypatch.setattr(fk, "_variant", variant)
    n, k = 1000, 2048
    w = prepare_nvfp4(_gpu_weight(n, k, seed=variant))
    for dtype in (torch.bfloat16, torch.float16):
        for m in range(1, 17):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = _ref64(x, w)
            for splits in (1, 5):
                y = _poisoned_call(lambda: fk.nvfp4_linear_cuda(x, w, splits=splits), m, n, dtype)  # noqa: B023
                assert _rel(y, ref) < 1e-2, (variant, dtype, m, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 5, 16])
@pytest.mark.parametrize("variant", [4, 7, 9, 10, 11])
def test_kernel_any_grid(monkeypatch, m, variant):
    """Stream-K: any CTA count, so CTA ranges start and end inside row blocks, span several row blocks,
    or are empty (more CTAs than units); the workspace is clean afterwards. Variants 7 and 9 also split
    each range over 4 or 2 warps (fewer chunks than warps included)."""
    from fp4reason.kernels import cuda as fk

    monkeypatch.setattr(fk, "_variant", variant)
    n, k = 1000, 2048  # 8 row blocks of 128 (63 of 16) x 16 chunks = 128 (1008) units
    w = prepare_nvfp4(_gpu_weight(n, k, seed=m))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = _ref64(x, w, bias)
    for ctas in (1, 3, 7, 8, 9, 33, 127, 128, 200, 1100):
        y = _poisoned_call(lambda: fk.nvfp4_linear_cuda(x, w, bias, ctas=ctas), m, n, torch.bfloat16)  # noqa: B023
        assert _rel(y, ref) < 1e-2, (m, ctas)
    for work, counters in fk._workspaces.values():
        assert not work.any() and not counters.any()


@pytest.mark.gpu
def test_kernel_scales_448_large_activations_no_overflow():
    n, k = 512, 4096
    base = torch.randn(n, k, device="cuda")
    base.view(n, k // 16, 16)[..., 0] = 8.0  # every block has the tensor amax -> every block scale is 448
    w = quantize_nvfp4(base)
    assert (w.block_scale.float() == 448).all()
    for dtype, amp in ((torch.bfloat16, 3e3), (torch.float16, 30.0)):
        x = (torch.randn(16, k, device="cuda") * amp).to(dtype)
        y = nvfp4_linear(x, w)
        assert torch.isfinite(y).all(), dtype
        assert _rel(y, _ref64(x, w)) < 1e-2, dtype


@pytest.mark.gpu
def test_kernel_nan_propagates():
    w = _gpu_weight(1024, 4096)
    x = torch.randn(6, 4096, device="cuda", dtype=torch.bfloat16)
    x[2, 100] = float("nan")
    y = nvfp4_linear(x, w)
    assert torch.isnan(y[2]).all()
    others = y[[0, 1, 3, 4, 5]]
    assert torch.isfinite(others).all() and _rel(others, _ref64(x[[0, 1, 3, 4, 5]], w)) < 1e-2
    y2 = nvfp4_linear(x[[0, 1]], w)  # the workspace holds no NaN afterwards
    assert torch.isfinite(y2).all()


@pytest.mark.gpu
def test_kernel_act_quant_matches_w4a4_reference():
    w = _gpu_weight(2048, 4096)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16) * 2
    gs = torch.tensor([448 * 6 / 12.0], device="cuda")
    y = nvfp4_linear(x, w, act_quant=True, input_global_scale=gs)
    assert _rel(y, _ref64(qdq_nvfp4(x, gs), w)) < 1e-2


@pytest.mark.gpu
def test_kernel_cuda_graph_replay():
    w = prepare_nvfp4(_gpu_weight(4096, 4096))
    for m in (1, 16):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        nvfp4_linear(x, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = nvfp4_linear(x, w)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(y, _ref64(x, w)) < 1e-2, m


@pytest.mark.gpu
def test_kernel_fused_qkv_equals_parts():
    g = torch.tensor([448 * 6 / 0.1], device="cuda")
    parts = [quantize_nvfp4(torch.randn(nn, 4096, device="cuda") * 0.02, g) for nn in (4096, 1024, 1024)]
    fused = NVFP4Tensor.cat(parts)
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    y = nvfp4_linear(x, fused)
    ys = torch.cat([nvfp4_linear(x, p) for p in parts], dim=-1)
    assert _rel(y, ys.double()) < 1e-3 and _rel(y, _ref64(x, fused)) < 1e-2


@pytest.mark.gpu
def test_kernel_torch_compile():
    w = _gpu_weight(1024, 2048)
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda a: nvfp4_linear(a, w) * 2)
    assert _rel(f(x), 2 * _ref64(x, w)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(range(12)))
def test_kernel_gated_every_variant(monkeypatch, variant):
    """The silu(gate) * up epilogue: every variant, both dtypes, every M, with bias, on whole row blocks and
    on split / stream-K grids (the last CTA's path), against float64; the workspace is clean afterwards."""
    from fp4reason.kernels import cuda as fk

    monkeypatch.setattr(fk, "_variant", variant)
    n, k = 2000, 2048  # I = 1000: not a multiple of any CTA's rows
    w = prepare_nvfp4(_gpu_weight(n, k, seed=variant), gated=True)
    for dtype in (torch.bfloat16, torch.float16):
        bias = torch.randn(n, device="cuda", dtype=dtype) * 0.1
        for m in range(1, 17):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = _silu_mul64(x, w, bias)
            for grid in (dict(splits=1), dict(splits=5), dict(ctas=37)):
                call = lambda: fk.nvfp4_linear_cuda(x, w, bias, gated=True, **grid)  # noqa: B023, E731
                y = _poisoned_call(call, m, n // 2, dtype)
                assert y.shape == (m, n // 2) and _rel(y, ref) < 1e-2, (variant, dtype, m, grid)
    for work, counters in fk._workspaces.values():
        assert not work.any() and not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-8b.gate_up", "llama3.1-8b.gate_up", "qwen3-32b.gate_up"])
def test_kernel_gated_model_shapes_equal_linear_then_silu(name):
    """Model gate_up shapes with the default dispatch: float64-close, and equal to the plain kernel followed
    by torch's silu(gate) * up up to a rounding step."""
    from fp4reason.kernels import silu_mul_reference

    n, k = SHAPES[name]
    w = _gpu_weight(n, k)
    wg = prepare_nvfp4(w, gated=True)
    for m in (1, 4, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = _poisoned_call(lambda: nvfp4_silu_mul(x, wg), m, n // 2, torch.bfloat16)  # noqa: B023
        assert _rel(y, _silu_mul64(x, w)) < 1e-2, (name, m)
        two = silu_mul_reference(nvfp4_linear(x, w)).float()
        # the two paths may sum a row's k in another order (another grid), so a gate or up value can round to
        # the neighbouring bf16 value: equal almost everywhere, never further apart than such a step
        assert (y.float() == two).float().mean() > 0.9, (name, m)
        assert (y.float() - two).abs().max() <= 2**-6 * two.abs().max(), (name, m)


@pytest.mark.gpu
def test_kernel_gated_nan_propagates():
    w = prepare_nvfp4(_gpu_weight(2048, 4096), gated=True)
    x = torch.randn(6, 4096, device="cuda", dtype=torch.bfloat16)
    x[2, 100] = float("nan")
    from fp4reason.kernels.cuda import nvfp4_linear_cuda

    for splits in (1, 4):
        y = nvfp4_linear_cuda(x, w, splits=splits, gated=True)
        assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all(), splits


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [None, 4, 9])
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_norm_every_m(monkeypatch, variant, gated):
    """The add + RMSNorm inside the kernel (NORM variants 12 / 13, from the default dispatch or forced 4 / 9):
    every M, both dtypes, with and without delta, with bias, on the default grid and on 1, 37 and 600 CTAs
    (more than the 256 / 512 units: CTA 0 has none). The new residual equals torch's x + delta exactly; the
    output matches float64 math on it."""
    from fp4reason.kernels import cuda as fk

    monkeypatch.setattr(fk, "_variant", variant)
    n, k, eps = 2000, 2048, 1e-6
    w = prepare_nvfp4(_gpu_weight(n, k, seed=3), gated=gated)
    out_n = n // 2 if gated else n
    for dtype in (torch.bfloat16, torch.float16):
        nw = (1 + 0.2 * torch.randn(k, device="cuda")).to(dtype)
        bias = (torch.randn(n, device="cuda") * 0.1).to(dtype)
        for m in range(1, 17):
            assert fk.norm_variant(fk.variant_for(m, n, 0, gated), m, k) in (12, 13)
            x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
            delta = torch.randn(m, k, device="cuda", dtype=dtype)
            for d in (delta, None):
                h_ref = x + d if d is not None else x
                xn = _norm64(h_ref, nw, eps)
                ref = _silu_mul64(xn, w, bias) if gated else _ref64(xn, w, bias)
                for ctas in (0, 1, 37, 600):  # 600: more CTAs than units, the first ones empty
                    call = lambda: fk.nvfp4_norm_linear_cuda(x, d, nw, eps, w, bias, ctas=ctas, gated=gated)  # noqa: B023, E731
                    y, h = _poisoned_call(call, m, out_n, dtype)
                    assert torch.equal(h, h_ref), (dtype, m, d is None, ctas)
                    assert y.shape == (m, out_n) and _rel(y, ref) < 1e-2, (dtype, m, d is None, ctas)
    for work, counters in fk._workspaces.values():
        assert not work.any() and not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-8b.qkv", "qwen3-8b.gate_up", "llama3.1-8b.gate_up", "qwen3-32b.qkv"])
def test_kernel_norm_model_shapes(name):
    """Model qkv / gate_up shapes with the default dispatch: float64-close, and equal to torch's add + norm
    followed by the plain kernel up to a rounding step (another summation order for the squares)."""
    from fp4reason.kernels import rms_norm_reference

    n, k = SHAPES[name]
    gated = name.endswith("gate_up")
    w = prepare_nvfp4(_gpu_weight(n, k), gated=gated)
    nw = (1 + 0.2 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    proj = nvfp4_silu_mul if gated else nvfp4_linear
    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
        delta = torch.randn_like(x)
        y, h = nvfp4_norm_linear(x, nw, 1e-6, w, delta=delta, gated=gated)
        xn = _norm64(x + delta, nw, 1e-6)
        assert _rel(y, _silu_mul64(xn, w) if gated else _ref64(xn, w)) < 1e-2, (name, m)
        two = proj(rms_norm_reference(x + delta, nw, 1e-6), w).float()
        assert (y.float() == two).float().mean() > 0.9, (name, m)
        assert (y.float() - two).abs().max() <= 2**-5 * two.abs().max(), (name, m)


@pytest.mark.gpu
def test_kernel_norm_nan_and_graph_replay():
    """A NaN in one token row makes that row's output NaN and leaves the others; a captured call replays."""
    w = prepare_nvfp4(_gpu_weight(4096, 4096))
    nw = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(6, 4096, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn_like(x)
    x[2, 100] = float("nan")
    y, h = nvfp4_norm_linear(x, nw, 1e-6, w, delta=delta)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all() and torch.isnan(h[2, 100])
    for m in (1, 4):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        delta = torch.randn_like(x)
        nvfp4_norm_linear(x, nw, 1e-6, w, delta=delta)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, h = nvfp4_norm_linear(x, nw, 1e-6, w, delta=delta)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            delta.copy_(torch.randn_like(delta))
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(h, x + delta) and _rel(y, _ref64(_norm64(x + delta, nw, 1e-6), w)) < 1e-2, m
