"""Triton quantize-dequantize for QAT: bit-identical to ``fp4reason.formats.qdq_nvfp4`` / ``qdq_kv4`` and
``fp4reason.train.fakequant.qdq_nvfp4_stacked``, in two launches per call instead of ~20 torch kernels.

1. ``_absmax_partials`` (grid partials x groups): each program reduces a contiguous chunk to the largest
   ``|x|`` as its float32 bit pattern. For non-negative floats integer order is float order and every NaN
   lies above +inf, so an integer max is a float amax that propagates NaN like ``torch.amax``.
2. ``_qdq_kernel`` (grid tiles x groups): each program max-reduces its group's partials (a few hundred
   integers from L2), derives the tensor scale exactly as the torch code does, then reads 128 blocks of
   16, quantizes-dequantizes them in float32 registers and writes the result once.

Exactness, op for op with the torch reference on the same device:
* every tensor/tensor division is IEEE ``div_rn`` (Triton's ``/`` lowers to the approximate div.full);
* a division by a Python scalar is what torch does there: a true division on CPU, a multiplication by the
  float32 reciprocal on CUDA (``div_true_kernel_cuda``'s CPU-scalar path); ``2688 / amax`` is
  ``amax.reciprocal() * 2688`` everywhere (``Tensor.__rtruediv__``);
* e4m3 and round-half-even come from integer/exponent arithmetic and the 1.5 * 2^23 add-subtract, not from
  casts, so the interpreter (CPU tests) and the GPU agree; float32 -> bfloat16 is done on the bits too (the
  interpreter truncates); FMA contraction is switched off at launch;
* clamps are ``where`` chains (NaN passes through, as in ``torch.clamp``); ``sign`` is ``(x>0)-(x<0)``.

No host sync, fixed launch shapes per input shape: CUDA-graph safe. Runs on CUDA tensors, or on CPU
tensors when this module was imported under ``TRITON_INTERPRET=1`` (the tests).
"""

import torch
import triton
import triton.language as tl

from fp4reason.formats.nvfp4 import BLOCK_SIZE, _check_blocks

_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + M - M rounds |x| < 2^22 to an integer, ties to even
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
# the float32 reciprocals torch's CUDA division by a Python scalar multiplies with (1/6 and 1/(3.5*448))
_INV_E2M1_MAX = tl.constexpr(torch.tensor(1.0).div(6.0).item())
_INV_KV_G = tl.constexpr(torch.tensor(1.0).div(3.5 * 448.0).item())
AMAX_BLOCK = 4096  # elements per loop iteration of an amax program
MAX_PARTIALS = 512  # amax programs per call (all groups together), so each qdq program reads few partials
TILE_BLOCKS = 128  # 16-element blocks per qdq program (2048 elements)
_MAX_GROUP = 2**31 - 2**20  # elements per group: int32 offsets


def interpreted() -> bool:
    """True if these kernels run in the Triton interpreter (CPU tensors, slow)."""
    return not isinstance(_qdq_kernel, triton.runtime.JITFunction)


@triton.jit
def load_f32(ptr, idx, mask, IN_BF16: tl.constexpr):
    if IN_BF16:  # bf16 bits << 16 are its float32 bits (the interpreter's bf16 cast is not exact)
        h = tl.load(ptr + idx, mask=mask, other=0)
        x = ((h.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def bf16_bits(y):
    """float32 -> bfloat16 bits (low 16 of an int32), nearest-even as c10 rounds; NaN -> 0x7FC0."""
    u = y.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    r = (a + 0x7FFF + ((a >> 16) & 1)) >> 16
    return tl.where(a > 0x7F800000, 0x7FC0, r) | ((u >> 16) & 0x8000)


@triton.jit
def round_bf16(y):
    """float32 rounded to the nearest bfloat16 value, as float32 (what ``.to(bfloat16).float()`` gives)."""
    return (bf16_bits(y) << 16).to(tl.float32, bitcast=True)


@triton.jit
def store_as(ptr, idx, y, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:  # on the bits: the interpreter's float32 -> bfloat16 cast truncates
        tl.store(ptr + idx, bf16_bits(y).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + idx, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _abs_bits(x):
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _rint(x):
    return (x + _MAGIC) - _MAGIC


@triton.jit
def _sign(x):
    return (x > 0.0).to(tl.float32) - (x < 0.0).to(tl.float32)


@triton.jit
def _clamp(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _e4m3(v):
    """Round float32 ``v`` (|v| <= 448 or NaN) to the nearest float8_e4m3fn value, ties to even."""
    bits = v.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    e = tl.maximum((a >> 23) - 127, -6)  # e4m3's exponent, subnormals (step 2^-9) below 2^-6
    up = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e): 3 mantissa bits become integer bits
    down = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e-3)
    r = _rint(a.to(tl.float32, bitcast=True) * up) * down
    return tl.where(bits < 0, -r, r)


@triton.jit
def _group_amax(part_ptr, grp, NP, NPB: tl.constexpr):
    i = tl.arange(0, NPB)
    p = tl.load(part_ptr + grp * NP + i, mask=i < NP, other=0)
    return tl.max(p, axis=0).to(tl.float32, bitcast=True)


@triton.jit
def _absmax_partials(x_ptr, part_ptr, n, NP, BLOCK: tl.constexpr, ITERS: tl.constexpr, IN_BF16: tl.constexpr):
    p = tl.program_id(0)
    grp = tl.program_id(1)
    base = x_ptr + grp.to(tl.int64) * n
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        idx = (p * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, _abs_bits(load_f32(base, idx, idx < n, IN_BF16)))
    tl.store(part_ptr + grp * NP + p, tl.max(acc, axis=0))


@triton.jit
def qdq_nvfp4_blocks(x, g, RECIP: tl.constexpr):
    """NVFP4 quantize-dequantize of float32 blocks ``x`` [B, 16] with tensor scale ``g`` (formats.nvfp4's
    ``_quantize_blocks``, op for op; ``RECIP``: divide by 6 as torch does on CUDA). For other kernels too."""
    bam = tl.max(_abs_bits(x), axis=1).to(tl.float32, bitcast=True)  # block amax, NaN-propagating
    if RECIP:
        t = bam * _INV_E2M1_MAX
    else:
        t = tl.math.div_rn(bam, 6.0)
    s = _e4m3(_clamp(t * g, -448.0, 448.0))
    step = tl.math.div_rn(tl.where(s == 0.0, 0.125, s), g)
    v = _clamp(tl.math.div_rn(x, step[:, None]), -6.0, 6.0)
    a = tl.abs(v)
    grid = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))  # E2M1 spacing
    inv = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))  # a * inv == a / grid exactly
    return (_sign(v) * (_rint(a * inv) * grid)) * step[:, None]


@triton.jit
def _qdq_kernel(
    x_ptr, y_ptr, part_ptr, gs_ptr, n, NP,
    TB: tl.constexpr, NPB: tl.constexpr, KV4: tl.constexpr, STATIC: tl.constexpr, RECIP: tl.constexpr,
    IN_BF16: tl.constexpr, OUT_BF16: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # static scale only: nothing before this kernel in the call
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    rows = pid * TB + tl.arange(0, TB)
    idx = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = idx < n
    off = grp.to(tl.int64) * n
    x = load_f32(x_ptr + off, idx, mask, IN_BF16)
    if KV4:  # formats.kv4.qdq_kv4
        bam = tl.max(_abs_bits(x), axis=1).to(tl.float32, bitcast=True)  # block amax, NaN-propagating
        amax = _group_amax(part_ptr, grp, NP, NPB)
        if RECIP:
            g = amax * _INV_KV_G
        else:
            g = tl.math.div_rn(amax, 1568.0)
        t = tl.math.div_rn(bam, tl.where(g > 0.0, g, 1.0) * 3.5)
        s = _e4m3(tl.where(t > 448.0, 448.0, t)) * g
        pos = s > 0.0
        v = _clamp(tl.math.div_rn(x, tl.where(pos, s, 1.0)[:, None]), -3.5, 3.5)
        q = _sign(v) * (_rint(tl.abs(v) * 2.0) * 0.5)
        y = tl.where(pos[:, None], q, x * 0.0) * s[:, None]
    else:  # formats.nvfp4._quantize_blocks (+ nvfp4_global_scale when dynamic)
        if STATIC:
            g = tl.load(gs_ptr)
        else:
            amax = _group_amax(part_ptr, grp, NP, NPB)
            g = tl.math.div_rn(1.0, tl.where(amax < _TINY, _TINY, amax)) * 2688.0
            g = tl.where((g != g) | (tl.abs(g) == float("inf")), 1.0, g)
        y = qdq_nvfp4_blocks(x, g, RECIP)
    store_as(y_ptr + off, idx, y, mask, OUT_BF16)


def check_device(x: torch.Tensor) -> None:
    if x.device.type == "cuda" or (x.device.type == "cpu" and interpreted()):
        return
    raise RuntimeError(
        f"Triton fake quantization runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
        f"got a tensor on {x.device}"
    )


def bits_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _qdq(
    x: torch.Tensor,
    groups: int,
    *,
    kv4: bool = False,
    global_scale: torch.Tensor | None = None,
    pdl: bool = False,
):
    """Quantize-dequantize contiguous ``x`` viewed as ``groups`` equal parts, each its own tensor scale
    (``pdl``: programmatic dependent launch, static ``global_scale`` only)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"Triton fake quantization supports float32/bfloat16/float16, got {x.dtype}")
    check_device(x)
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel() // groups if groups else 0
    if n == 0:
        if global_scale is None and groups:
            raise ValueError(f"cannot take the amax of an empty tensor of shape {tuple(x.shape)}")
        return y
    if n > _MAX_GROUP:
        raise ValueError(f"{n} elements per tensor exceed this kernel's int32 indexing ({_MAX_GROUP})")
    bf16, recip = x.dtype == torch.bfloat16, x.device.type == "cuda"
    if global_scale is None:
        # loop trip count a power of two (few compiled variants), at most MAX_PARTIALS programs in all
        per_group = max(1, MAX_PARTIALS // groups)
        iters = triton.next_power_of_2(triton.cdiv(triton.cdiv(n, AMAX_BLOCK), per_group))
        n_part = triton.cdiv(n, iters * AMAX_BLOCK)
        parts = torch.empty(groups * n_part, dtype=torch.int32, device=x.device)
        _absmax_partials[(n_part, groups)](
            bits_view(x), parts, n, n_part, BLOCK=AMAX_BLOCK, ITERS=iters, IN_BF16=bf16, num_warps=8
        )
        gs = parts  # unused
    else:
        gs = global_scale.to(device=x.device, dtype=torch.float32).reshape(1)
        parts, n_part = gs, 1  # unused
    _qdq_kernel[(triton.cdiv(n // BLOCK_SIZE, TILE_BLOCKS), groups)](
        bits_view(x), bits_view(y), parts, gs, n, n_part,
        TB=TILE_BLOCKS, NPB=max(16, triton.next_power_of_2(n_part)), KV4=kv4, STATIC=global_scale is not None,
        RECIP=recip, IN_BF16=bf16, OUT_BF16=bf16, PDL=pdl and global_scale is not None, num_warps=4,
        launch_pdl=pdl and global_scale is not None, enable_fp_fusion=False,
    )  # fmt: skip
    return y


def qdq_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor | None = None, *, pdl: bool = False
) -> torch.Tensor:
    """``fp4reason.formats.qdq_nvfp4`` (static ``global_scale`` if given, else dynamic), bit for bit.
    ``pdl``: launch with programmatic dependent launch (Hopper+, static scale; the decode engine)."""
    _check_blocks(x, BLOCK_SIZE, "input")
    return _qdq(x, 1, global_scale=global_scale, pdl=pdl)


def qdq_nvfp4_stacked(w: torch.Tensor) -> torch.Tensor:
    """``fp4reason.train.fakequant.qdq_nvfp4_stacked``: w [G, N, K], each ``w[g]`` its own tensor scale."""
    if w.ndim != 3:
        raise ValueError(f"stacked weights must be [G, N, K], got shape {tuple(w.shape)}")
    _check_blocks(w, BLOCK_SIZE, "stacked weights")
    return _qdq(w, w.shape[0])


def qdq_kv4(x: torch.Tensor) -> torch.Tensor:
    """``fp4reason.formats.qdq_kv4`` (E1M2 KV4, dynamic tensor scale), bit for bit."""
    _check_blocks(x, BLOCK_SIZE, "key/value")
    return _qdq(x, 1, kv4=True)
