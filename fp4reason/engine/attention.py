"""Fused decode attention (T=1) in Triton: q/k RMSNorm, RoPE, KV-cache write and GQA attention, one launch.

Everything between the fused qkv projection and the o projection of a decode step: the kernel reads the
raw projection row [B, (H + 2 Hkv) D], applies Qwen3's per-head q/k RMSNorm and RoPE at each row's own
position ``slot - start[b]``, writes the new k/v into the static cache at ``slot`` and attends over the
row's real slots ``start[b]..slot``; rows are left-padded as in ``fp4reason.engine.model``. One program
serves one (row, KV head, KV split) and all G query heads of that KV head, so K/V are read once per
split. Long contexts are split ("flash-decoding"): each split writes a partial (max, sum, unnormalized
output); the last split of a (row, KV head) to arrive (an arrival counter, reset by that program) combines
them, so the step needs no second kernel (with ``FP4REASON_ATTN_COMBINE=0``, for A/B runs, a tiny second
kernel combines). With one split the kernel writes the output.
The new token's key and value enter split 0 from registers, so no program reads the slot being written.

``fused=False`` is the attention alone, for KV4 (the torch path quantizes and writes the cache, the
kernel reads it including ``slot``). Both read ``slot``/``start`` from device tensors: CUDA-graph safe.

The kernels are decorated on first use, so ``TRITON_INTERPRET=1`` (CPU tests) only has to be set before
the first call, not before this module is imported.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from fp4reason.kernels.cuda import pdl_enabled

try:
    import triton
    import triton.language as tl

    from fp4reason.kernels.fakequant import qdq_nvfp4_blocks, round_bf16
except ImportError:  # the engine's other attention paths do not need triton
    triton = tl = None


def _as_out_dtype(o, KIND: tl.constexpr):
    """float32 rounded to the output dtype's nearest value (KIND 1 bf16, 2 fp16, 0 fp32), on the bits for bf16
    (the interpreter's cast truncates)."""
    if KIND == 1:
        o = round_bf16(o)
    elif KIND == 2:
        o = o.to(tl.float16).to(tl.float32)
    return o


def _out_value(o, QGS, R: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, RECIP: tl.constexpr,
               KIND: tl.constexpr):  # fmt: skip
    """The normalized output [R, BLOCK_D] as stored; QUANT: NVFP4 quantize-dequantized per 16 with tensor
    scale QGS, as ``formats.qdq_nvfp4`` does it to the output in its dtype."""
    if QUANT:
        blocks = tl.reshape(_as_out_dtype(o, KIND), [R * BLOCK_D // 16, 16])
        o = _as_out_dtype(tl.reshape(qdq_nvfp4_blocks(blocks, tl.load(QGS), RECIP), [R, BLOCK_D]), KIND)
    return o


def _step_rows(Slot, Start, b, Cos, Sin, QW, KW, d, dm, dr, D: tl.constexpr, BLOCK_D: tl.constexpr,
               FUSED: tl.constexpr, HAS_NORM: tl.constexpr):  # fmt: skip
    """(slot, the row's start, and for the fused kernel the RoPE rows at its position and the q / k norm
    weights, each also at the rotate_half source index ``dr``; float32)."""
    slot = tl.load(Slot)
    start = tl.load(Start + b)
    zero = tl.zeros([BLOCK_D], tl.float32)
    cos, sin, qw, qwr, kw, kwr = zero, zero, zero, zero, zero, zero
    if FUSED:
        pos = slot - start
        cos = tl.load(Cos + pos * D + d, mask=dm, other=0.0).to(tl.float32)
        sin = tl.load(Sin + pos * D + d, mask=dm, other=0.0).to(tl.float32)
        if HAS_NORM:
            qw = tl.load(QW + d, mask=dm, other=0.0).to(tl.float32)
            qwr = tl.load(QW + dr, mask=dm, other=0.0).to(tl.float32)
            kw = tl.load(KW + d, mask=dm, other=0.0).to(tl.float32)
            kwr = tl.load(KW + dr, mask=dm, other=0.0).to(tl.float32)
    return slot, start, cos, sin, qw, qwr, kw, kwr


if triton is not None:  # helpers the kernels call, decorated when fakequant's helpers are
    _as_out_dtype, _out_value = triton.jit(_as_out_dtype), triton.jit(_out_value)
    _step_rows = triton.jit(_step_rows)


def _attn_fwd(
    Q, stride_qb, stride_qh,
    KC, VC, stride_cb, stride_ch, stride_cs,
    Slot, Start, Cos, Sin, QW, KW, eps, scale,
    Out, stride_ob, stride_oh, Acc, Mx, Sm, Cnt, QGS,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS, ITERS: tl.constexpr,
    ONE_SPLIT: tl.constexpr, FUSED: tl.constexpr, HAS_NORM: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr, EARLY_KV: tl.constexpr, EARLY_POS: tl.constexpr, KV_LEN, COMBINE: tl.constexpr,
    G_P2: tl.constexpr,
    BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, QUANT: tl.constexpr, RECIP: tl.constexpr,
    KIND: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    n_off = tl.arange(0, BLOCK_N)
    kc_row = KC + b * stride_cb + kh * stride_ch
    vc_row = VC + b * stride_cb + kh * stride_ch
    if EARLY_KV:
        # one block per program at a static place (block sp of the bucket), requested before the wait for
        # the previous kernel: the cache slots read here were written by earlier decode steps (this kernel
        # writes the new slot, last), so they overlap the qkv projection's tail. Slots outside the row's
        # range are masked after the load (they may hold stale values).
        s = sp * BLOCK_N + n_off
        inb = (s < KV_LEN)[:, None] & dm[None, :]
        k = tl.load(kc_row + s[:, None] * stride_cs + d[None, :], mask=inb, other=0.0)
        v = tl.load(vc_row + s[:, None] * stride_cs + d[None, :], mask=inb, other=0.0)
    half = D // 2
    dr = tl.where(d < half, d + half, d - half)  # rotate_half's source index
    sign = tl.where(d < half, -1.0, 1.0)
    if EARLY_POS:
        # slot and start, and what depends only on them and on parameters (RoPE rows, norm weights), are read
        # before the wait too: they were written before the step began, and no kernel of the step lets the
        # next one start before its own wait (the first, the embedding lookup, has no programmatic launch).
        # After the wait one L2 round trip remains (q, k, v), not two (slot, then the RoPE rows at its place).
        slot, start, cos, sin, qw, qwr, kw, kwr = _step_rows(
            Slot, Start, b, Cos, Sin, QW, KW, d, dm, dr, D, BLOCK_D, FUSED, HAS_NORM
        )
    if PDL:  # everything below reads what earlier kernels wrote; the next kernel may start its prologue
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if not EARLY_POS:
        slot, start, cos, sin, qw, qwr, kw, kwr = _step_rows(
            Slot, Start, b, Cos, Sin, QW, KW, d, dm, dr, D, BLOCK_D, FUSED, HAS_NORM
        )
    dt = KC.dtype.element_ty
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    qmask = gm[:, None] & dm[None, :]
    qh = kh * G + g
    q_ptr = Q + b * stride_qb + qh[:, None] * stride_qh
    hi = slot if FUSED else slot + 1  # fused: the cache holds slots < slot, the new one comes from registers
    lo = start
    if EARLY_KV:
        n0 = sp * BLOCK_N
        n1 = tl.minimum(n0 + BLOCK_N, hi)
        sm = (s >= lo) & (s < n1)
        v = tl.where(sm[:, None], v, 0.0)  # a stale NaN must not reach p @ v through p = 0
    else:
        base = (lo // BLOCK_N) * BLOCK_N
        per = tl.cdiv(tl.cdiv(hi - base, BLOCK_N), SPLITS) * BLOCK_N
        n0 = base + sp * per
        n1 = tl.minimum(n0 + per, hi)
    if ITERS == 1 and not EARLY_KV:
        # one block per program (short contexts, small batches): its K and V are requested before q is read
        # and processed, so the loads share DRAM round trips (nothing here reads the slot this kernel
        # writes, and the write comes last). Longer loops keep their loads inside, where Triton pipelines
        # them (loads carried across iterations were slower at batch 8-16 on the H200, NOTES v11).
        s = n0 + n_off
        sm = (s >= lo) & (s < n1)
        k = tl.load(kc_row + s[:, None] * stride_cs + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
        v = tl.load(vc_row + s[:, None] * stride_cs + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    if FUSED:
        # Q is the projection row: q heads 0..H-1, k heads H.., v heads H+HKV.. (head stride D)
        k_ptr = Q + b * stride_qb + (H + kh) * stride_qh
        v_ptr = Q + b * stride_qb + (H + HKV + kh) * stride_qh
        q = tl.load(q_ptr + d[None, :], mask=qmask, other=0.0).to(tl.float32)
        qr = tl.load(q_ptr + dr[None, :], mask=qmask, other=0.0).to(tl.float32)
        kf = tl.load(k_ptr + d, mask=dm, other=0.0).to(tl.float32)
        kfr = tl.load(k_ptr + dr, mask=dm, other=0.0).to(tl.float32)
        v_new = tl.load(v_ptr + d, mask=dm, other=0.0)
        if HAS_NORM:  # HF RMSNorm: float32 statistics, weight applied in the model dtype
            qs = tl.rsqrt(tl.sum(q * q, 1) / D + eps)[:, None]
            ks = tl.rsqrt(tl.sum(kf * kf, 0) / D + eps)
            q = ((q * qs).to(dt).to(tl.float32) * qw[None, :]).to(dt).to(tl.float32)
            qr = ((qr * qs).to(dt).to(tl.float32) * qwr[None, :]).to(dt).to(tl.float32)
            kf = ((kf * ks).to(dt).to(tl.float32) * kw).to(dt).to(tl.float32)
            kfr = ((kfr * ks).to(dt).to(tl.float32) * kwr).to(dt).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rounded where the torch path rounds
        q = (q * cos[None, :]).to(dt).to(tl.float32) + (sign * qr * sin[None, :]).to(dt).to(tl.float32)
        kf = (kf * cos).to(dt).to(tl.float32) + (sign * kfr * sin).to(dt).to(tl.float32)
        q, k_new = q.to(dt), kf.to(dt)
    else:
        q = tl.load(q_ptr + d[None, :], mask=qmask, other=0.0).to(dt)
    m_i = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: an empty split stays NaN-free
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(ITERS):  # a static trip count: blocks past this split's end load nothing
        if ITERS > 1:
            s = n0 + i * BLOCK_N + n_off
            sm = (s >= lo) & (s < n1)
            kvmask = sm[:, None] & dm[None, :]
            k = tl.load(kc_row + s[:, None] * stride_cs + d[None, :], mask=kvmask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(sm[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if ITERS > 1:
            v = tl.load(vc_row + s[:, None] * stride_cs + d[None, :], mask=kvmask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(dt), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(dt), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if FUSED:  # the new token, in split 0 only, which also writes it into the cache
        first = sp == 0
        tl.store(kc_row + slot * stride_cs + d, k_new, mask=dm & first)
        tl.store(vc_row + slot * stride_cs + d, v_new, mask=dm & first)
        qk = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        qk = tl.where(first, qk, float("-inf"))
        m_new = tl.maximum(m_i, qk)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p.to(dt).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    if ONE_SPLIT:
        o_ptr = Out + b * stride_ob + qh[:, None] * stride_oh + d[None, :]
        tl.static_assert(not QUANT, "a quantized output is combined from partials")
        tl.store(o_ptr, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=qmask)
    else:
        row = (b * H + qh) * SPLITS + sp  # partials [B, H, SPLITS(, D)]
        tl.store(Mx + row, m_i, mask=gm)
        tl.store(Sm + row, l_i, mask=gm)
        tl.store(Acc + row[:, None] * D + d[None, :], acc, mask=qmask)
        if COMBINE:
            tl.debug_barrier()  # every thread's partial is written before this program counts as arrived
            cnt = Cnt + b * HKV + kh
            if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:  # the last split: combine
                gg = tl.arange(0, G_P2)
                gm2 = gg < G
                prow = (b * H + kh * G + gg) * SPLITS  # partials of this KV head's query heads
                sa = tl.arange(0, BLOCK_S)
                rm = gm2[:, None] & (sa < SPLITS)[None, :]
                # .cg: other SMs wrote these; read them from L2, never from a stale L1 line
                m_all = tl.load(Mx + prow[:, None] + sa[None, :], mask=rm, other=-1e30, cache_modifier=".cg")
                l_all = tl.load(Sm + prow[:, None] + sa[None, :], mask=rm, other=0.0, cache_modifier=".cg")
                m_max = tl.max(m_all, 1)  # split 0 is never empty: each row's maximum is real
                den = tl.sum(l_all * tl.exp(m_all - m_max[:, None]), 1)
                o_acc = tl.zeros([G_P2, BLOCK_D], tl.float32)
                for c in tl.static_range(BLOCK_S // CHUNK_S):  # [G, CHUNK_S, D] partials per round trip
                    sc = c * CHUNK_S + tl.arange(0, CHUNK_S)
                    rows = prow[:, None] + sc[None, :]
                    cm = gm2[:, None] & (sc < SPLITS)[None, :]
                    mc = tl.load(Mx + rows, mask=cm, other=-1e30, cache_modifier=".cg")
                    parts = tl.load(
                        Acc + rows[:, :, None] * D + d[None, None, :],
                        mask=cm[:, :, None] & dm[None, None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    o_acc += tl.sum(parts * tl.exp(mc - m_max[:, None])[:, :, None], 1)
                o_ptr = Out + b * stride_ob + (kh * G + gg)[:, None] * stride_oh + d[None, :]
                o_mask = gm2[:, None] & dm[None, :]
                o = _out_value(o_acc / den[:, None], QGS, G_P2, BLOCK_D, QUANT, RECIP, KIND)
                tl.store(o_ptr, o.to(Out.dtype.element_ty), mask=o_mask)
                tl.store(cnt, 0)  # every split of this (row, KV head) has arrived: ready for the next call


def _attn_reduce(
    Acc, Mx, Sm, Out, stride_ob, stride_oh, SPLITS, QGS,
    H: tl.constexpr, D: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    QUANT: tl.constexpr, RECIP: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm, dm = s < SPLITS, d < D
    row = (b * H + h) * SPLITS + s
    m = tl.load(Mx + row, mask=sm, other=float("-inf"))
    w = tl.exp(m - tl.max(m, 0))  # split 0 is never empty: the maximum is finite
    den = tl.sum(tl.load(Sm + row, mask=sm, other=0.0) * w, 0)
    acc = tl.load(Acc + row[:, None] * D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    out = tl.reshape(tl.sum(acc * w[:, None], 0) / den, [1, BLOCK_D])
    out = tl.reshape(_out_value(out, QGS, 1, BLOCK_D, QUANT, RECIP, KIND), [BLOCK_D])
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=dm)


_EARLY_KV = os.environ.get("FP4REASON_ATTN_EARLY_KV", "1") != "0"  # A/B switch (benchmarks/NOTES.md v12)
# the step's slot and RoPE rows read before the PDL wait: off until a GPU has run it (benchmarks/NOTES.md v19)
_EARLY_POS = os.environ.get("FP4REASON_ATTN_EARLY_POS", "0") == "1"
_COMBINE = os.environ.get("FP4REASON_ATTN_COMBINE", "1") != "0"  # A/B switch (benchmarks/NOTES.md v12)
COMBINE_REGS = 8192  # partial elements the combining program loads at once ([G, splits, D] fp32)


@functools.cache
def _kernels():
    return triton.jit(_attn_fwd), triton.jit(_attn_reduce)


def interpreted() -> bool:
    """Whether kernels decorated now run in the Triton interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(device: torch.device | str) -> str | None:
    """None if the kernels can run on ``device``, else why not (for a clear error upstream)."""
    kind = torch.device(device).type
    if triton is None:
        return "attn='triton' needs triton, which is not installed"
    if kind == "cpu" and not interpreted():
        return "attn='triton' on a CPU needs the Triton interpreter: set TRITON_INTERPRET=1"
    if kind not in ("cpu", "cuda"):
        return f"attn='triton' runs on CUDA (or the CPU interpreter), not on {kind}"
    return None


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def partition(
    batch: int, n_kv: int, kv_len: int, device, block_n: int | None = None, splits: int | None = None
) -> tuple[int, int, int]:
    """(KV splits, blocks per split, block size) for a static ``kv_len`` bucket.

    A split reads at most ``iters`` blocks (a compile-time trip count, a power of two, so few variants
    compile; Triton pipelines the loop): the largest up to 16 that still leaves >= 3/4 of a wave of programs,
    since one long pipelined loop per program beats many short programs (H200 sweep, benchmarks/NOTES.md
    v12: batch 16 at 1K context 30.3 -> 22.0 µs per layer). 16 blocks become 8 blocks of twice the size when
    those programs fit one wave (a 128-slot block's pipeline stages leave one program per SM), else 8
    (16-trip loops were not measured). ``block_n`` default: 64 on CUDA, 16 on the CPU (the interpreter tests
    then cover splits).
    """
    dev = torch.device(device)
    auto_block = block_n is None
    block_n = block_n or (64 if dev.type == "cuda" else 16)
    blocks = -(-kv_len // block_n)
    if splits is not None:
        return splits, -(-blocks // splits), block_n
    enough = 0.75 * _num_sms(dev)
    iters = 1
    while iters < min(16, blocks) and batch * n_kv * -(-blocks // (2 * iters)) >= enough:
        iters *= 2
    if auto_block and iters == 16:
        iters, wide = 8, -(-kv_len // (2 * block_n))
        if batch * n_kv * -(-wide // iters) <= _num_sms(dev):
            block_n, blocks = 2 * block_n, wide
    return -(-blocks // iters), iters, block_n


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    start: torch.Tensor,
    *,
    n_heads: int,
    n_kv: int,
    scale: float,
    kv_len: int,
    fused: bool = True,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 0.0,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    counters: torch.Tensor | None = None,
    out_global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one token per row; returns [B, H * D] in the cache dtype.

    ``fused=True``: ``q`` is the raw qkv projection [B, (H + 2 Hkv) D] (or [B, 1, ...]); q/k get the
    optional RMSNorm weights ``q_norm``/``k_norm`` and RoPE from the tables ``cos``/``sin`` [S, D]
    at position ``slot - start[b]``, and k/v are written into the caches at ``slot``.
    ``fused=False``: ``q`` [B, H, 1, D] is final and the caches already hold slot ``slot``.
    Caches [B_max, Hkv, S, D]; rows attend to slots ``start[b]..slot`` (``slot < kv_len``).
    ``counters``: int32 [>= B * Hkv], all zero, left zero (the splits' arrival counters; a CUDA graph needs
    them preallocated, e.g. next to the cache); None allocates zeroed ones per call.
    ``out_global_scale``: the next projection's static NVFP4 input scale (float32 [1]); the output is then
    returned quantize-dequantized as ``formats.qdq_nvfp4(out, out_global_scale)`` gives it (W4A4's o_proj
    input, without a kernel of its own).
    """
    if triton is None:
        raise RuntimeError("decode_attention needs triton")
    fwd, reduce = _kernels()
    b = start.shape[0]
    _, hkv, s_max, d = k_cache.shape
    if hkv != n_kv or n_heads % n_kv:
        raise ValueError(f"cache has {hkv} KV heads; expected {n_kv} dividing {n_heads} query heads")
    if d < 16 or d % 2:
        raise ValueError(f"head_dim must be even and >= 16 for the Triton kernel, got {d}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k/v caches must have the same shape and strides, last dim contiguous")
    if k_cache.shape[0] < b or kv_len > s_max:
        raise ValueError(f"cache {tuple(k_cache.shape)} too small for batch {b} and kv_len {kv_len}")
    dev, dt = k_cache.device, k_cache.dtype
    if slot.shape != (1,) or slot.dtype not in (torch.int32, torch.int64) or start.dtype != slot.dtype:
        raise ValueError("slot must be an integer tensor [1] and start [B] of the same dtype")
    if any(t.device != dev for t in (q, slot, start)):
        raise ValueError(f"q, slot and start must be on the caches' device {dev}")
    if fused:
        q2 = q.reshape(b, -1)
        if q2.shape[1] != (n_heads + 2 * n_kv) * d or q2.stride(1) != 1:
            raise ValueError(f"fused qkv must be [B, {(n_heads + 2 * n_kv) * d}] with a contiguous last dim")
        if cos is None or sin is None or cos.shape[1:] != (d,) or cos.shape[0] < kv_len:
            raise ValueError(f"fused attention needs cos/sin tables [>= {kv_len}, {d}]")
        if sin.shape != cos.shape or cos.stride() != (d, 1) or sin.stride() != (d, 1):
            raise ValueError("cos and sin must be contiguous tables of the same shape")
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm come together")
        stride_qb, stride_qh = q2.stride(0), d
    else:
        if q.shape != (b, n_heads, 1, d) or q.stride(-1) != 1:
            raise ValueError(f"q must be [{b}, {n_heads}, 1, {d}], got {tuple(q.shape)}")
        q2, stride_qb, stride_qh = q, q.stride(0), q.stride(1)
        cos = sin = q_norm = k_norm = None
    if q2.dtype != dt:
        raise ValueError(f"q dtype {q2.dtype} != cache dtype {dt}")
    g = n_heads // n_kv
    splits, iters, block_n = partition(b, n_kv, kv_len, dev, block_n, splits)
    out = torch.empty(b, n_heads, d, dtype=dt, device=dev)
    block_d = triton.next_power_of_2(d)
    quant = out_global_scale is not None
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}.get(dt)
    if quant:
        gs = out_global_scale
        if gs.numel() != 1 or gs.dtype != torch.float32 or gs.device != dev:
            raise ValueError(f"out_global_scale must be a float32 tensor of one element on {dev}")
        if d % 16 or d != block_d or kind is None:
            raise ValueError(
                f"a quantized output needs head_dim a power of two >= 16 and a float cache, got {d}, {dt}"
            )
    # a quantized output is made from partials even with one split: [G, D] there, not the dot's padded
    # [16, D] rows (whose divisions made ptxas spill)
    one_split = splits == 1 and not quant
    if not one_split:
        acc = torch.empty(b, n_heads, splits, d, dtype=torch.float32, device=dev)
        mx = torch.empty(b, n_heads, splits, dtype=torch.float32, device=dev)
        sm = torch.empty_like(mx)
    else:
        acc = mx = sm = out  # unused
    dummy = k_cache  # stands in for absent optional tensors (never read)
    qconsts = dict(QUANT=quant, RECIP=dev.type == "cuda", KIND=kind or 0)
    gs = out_global_scale if quant else dummy
    g_p2, block_s = triton.next_power_of_2(g), triton.next_power_of_2(splits)
    combine = not one_split and _COMBINE
    chunk_s = min(block_s, max(1, COMBINE_REGS // (g_p2 * block_d)))
    if counters is not None and (
        counters.dtype != torch.int32 or counters.device != dev or counters.numel() < b * n_kv
    ):
        raise ValueError(f"counters must be int32 [>= {b * n_kv}] on {dev}")
    if not combine:
        counters = dummy
    elif counters is None:
        counters = torch.zeros(b * n_kv, dtype=torch.int32, device=dev)
    pdl = pdl_enabled(dev)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    fwd[(b, n_kv, splits)](
        q2, stride_qb, stride_qh,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        slot, start,
        cos if cos is not None else dummy, sin if sin is not None else dummy,
        q_norm if q_norm is not None else dummy, k_norm if k_norm is not None else dummy,
        float(eps), float(scale),
        out, out.stride(0), out.stride(1), acc, mx, sm, counters, gs,
        H=n_heads, HKV=n_kv, G=g, D=d,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=block_d, BLOCK_N=block_n, SPLITS=splits,
        ITERS=iters, ONE_SPLIT=one_split, FUSED=fused, HAS_NORM=q_norm is not None,
        IEEE=dt == torch.float32, PDL=pdl, EARLY_KV=fused and iters == 1 and _EARLY_KV, EARLY_POS=_EARLY_POS,
        KV_LEN=kv_len,
        COMBINE=combine, G_P2=g_p2, BLOCK_S=block_s, CHUNK_S=chunk_s, **qconsts,
        num_warps=num_warps or 4, launch_pdl=pdl, **stages,
    )  # fmt: skip
    if not one_split and not combine:
        reduce[(b, n_heads)](
            acc, mx, sm, out, out.stride(0), out.stride(1), splits, gs,
            H=n_heads, D=d, BLOCK_S=block_s, BLOCK_D=block_d, PDL=pdl, **qconsts,
            num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return out.view(b, n_heads * d)


def decode_attention_reference(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: int,
    start: torch.Tensor,
    *,
    n_heads: int,
    n_kv: int,
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the fused kernel computes, in float64 one row and head at a time: (out [B, H*D], k_new, v_new).

    ``k_new``/``v_new`` [B, Hkv, D] are the post-norm/RoPE key and the value written at ``slot``;
    ``k_cache``/``v_cache`` are read (slots ``start[b]..slot-1``), not modified.
    """
    b, d = qkv.shape[0], k_cache.shape[-1]
    x = qkv.reshape(b, n_heads + 2 * n_kv, d).double()
    out = torch.empty(b, n_heads, d, dtype=torch.float64)
    k_new = torch.empty(b, n_kv, d, dtype=torch.float64)
    v_new = x[:, n_heads + n_kv :].clone()

    def norm(h, w):
        return h / math.sqrt(float((h * h).mean()) + eps) * w.double() if w is not None else h

    def rope(h, p):
        c, s = cos[p].double(), sin[p].double()
        return h * c + torch.cat((-h[d // 2 :], h[: d // 2])) * s

    for r in range(b):
        p = slot - int(start[r])
        for j in range(n_kv):
            k_new[r, j] = rope(norm(x[r, n_heads + j], k_norm), p)
            keys = torch.cat((k_cache[r, j, int(start[r]) : slot].double(), k_new[r, j][None]))
            vals = torch.cat((v_cache[r, j, int(start[r]) : slot].double(), v_new[r, j][None]))
            for i in range(j * (n_heads // n_kv), (j + 1) * (n_heads // n_kv)):
                qi = rope(norm(x[r, i], q_norm), p)
                w = torch.softmax(keys @ qi * scale, 0)
                out[r, i] = w @ vals
    return out.reshape(b, -1), k_new, v_new
