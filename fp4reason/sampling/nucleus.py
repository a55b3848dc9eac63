"""Top-p + min-p sampling on the GPU without sorting the vocabulary: a radix select on probability mass.

The nucleus of :func:`sampler.top_p_mask` (Hugging Face's TopPLogitsWarper rule) keeps the scaled logits
z >= c, where c is the smallest z whose ascending cumulative probability exceeds 1 - top_p. Sorting 152k
logits per step costs ~0.2 ms of a ~2.6 ms batch-1 decode step; c is found here instead digit by digit. Each
round sums, per vocabulary chunk, the unnormalized mass exp(z - max z) of the tokens that share the digits
chosen so far, split 16 ways by the next 4 bits of an order-preserving integer key; the next round merges the
chunks (in a fixed order: same result on every call) and picks the bin where the cumulative mass crosses the
threshold. bf16 / fp16 logits need 4 rounds (the 16-bit key of the logit itself: x -> x / T is injective
there, so it orders and ties like z), float32 logits 8 (the key of z). One more pass draws the exponential
race argmax p / q over the kept tokens per chunk, and a last launch merges the chunks.

Given the same exponential draws ``q`` (``torch.empty(B, V).exponential_(generator)``, as the torch path draws
them), the token is the torch path's unless a token's cumulative mass lies within float32 rounding of the
threshold (the two sum in different orders). No host sync, launch shapes fixed by (B, V): graph-capturable.
"""

import math

import torch
import triton
import triton.language as tl

from .fused import chunk_size

_BIG = tl.constexpr(2**31 - 1)
_SIGN = tl.constexpr(-(2**31))


@triton.jit
def _ordered_key(x, z, KEY_BITS: tl.constexpr):
    """Unsigned-ordered integer key (int32 bit pattern) of x (16-bit dtypes) or of z = x / T (float32); -0 is
    +0 (torch ties them)."""
    if KEY_BITS == 16:
        i = x.to(tl.int16, bitcast=True).to(tl.int32)
        i = tl.where(i == -32768, 0, i)
        s = tl.where(i < 0, i ^ 0x7FFF, i)
        return (s ^ 0x8000) & 0xFFFF
    else:
        i = z.to(tl.int32, bitcast=True)
        i = tl.where(z == 0.0, 0, i)
        s = tl.where(i < 0, i ^ 0x7FFFFFFF, i)
        return s ^ _SIGN


@triton.jit
def _round(
    x_ptr, stride_x, V, tdiv_ptr, max_ptr, log_min_p, keep_frac,
    q_ptr, part_ptr, pre_ptr, low_ptr, thr_ptr, best_ptr, arg_ptr, B, NC,
    R: tl.constexpr, NR: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
    RACE: tl.constexpr,
):  # fmt: skip
    """Round R < NR: merge round R - 1's bins (R > 0), then this chunk's masses by digit R. R == NR: the
    cutoff key from the last round (stored at pre[NR]), then with RACE this chunk's race winner (value, first
    index)."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    bins = tl.arange(0, 16)
    prefix = 0
    if R > 0:
        pc = tl.arange(0, BLOCK_C)
        ptrs = part_ptr + (((R - 1) * B + r) * NC + pc[:, None]) * 16 + bins[None, :]
        h = tl.sum(tl.load(ptrs, mask=pc[:, None] < NC, other=0.0), axis=0)
        if R == 1:
            thr = keep_frac * tl.sum(h, axis=0)
            low = 0.0
        else:
            thr = tl.load(thr_ptr + r)
            low = tl.load(low_ptr + (R - 1) * B + r)
            prefix = tl.load(pre_ptr + (R - 1) * B + r)
        crossed = (low + tl.cumsum(h, axis=0)) > thr
        b = tl.min(tl.where(crossed, bins, 16), axis=0)
        b = tl.maximum(tl.minimum(b, tl.max(tl.where(h > 0.0, bins, -1), axis=0)), 0)  # keep the top token
        low = low + tl.sum(tl.where(bins < b, h, 0.0), axis=0)
        prefix = (prefix << 4) | b
        if c == 0:
            tl.store(pre_ptr + R * B + r, prefix)
            tl.store(low_ptr + R * B + r, low)
            if R == 1:
                tl.store(thr_ptr + r, thr)
    if R == NR and not RACE:
        return

    offs = c * BLOCK + tl.arange(0, BLOCK)
    inb = offs < V
    x = tl.load(x_ptr + r.to(tl.int64) * stride_x + offs, mask=inb, other=float("-inf"))
    T = tl.load(tdiv_ptr + r)
    z = tl.div_rn(x.to(tl.float32), T)  # IEEE, as torch divides (Triton's / is approximate)
    zmax = tl.div_rn(tl.load(max_ptr + r).to(tl.float32), T)
    w = tl.where(inb & (z >= zmax + log_min_p), tl.exp(z - zmax), 0.0)
    key = _ordered_key(x, z, KEY_BITS)
    if R < NR:
        shift: tl.constexpr = KEY_BITS - 4 * (R + 1)
        sel = inb
        if R > 0:
            sel = sel & (((key >> (shift + 4)) & ((1 << (4 * R)) - 1)) == prefix)
        w = tl.where(sel, w, 0.0)
        digit = (key >> shift) & 15
        out = part_ptr + ((R * B + r) * NC + c) * 16
        for d in tl.static_range(16):  # 16 sums of [BLOCK]: a [BLOCK, 16] one-hot spills
            tl.store(out + d, tl.sum(tl.where(digit == d, w, 0.0), axis=0))
    else:
        kept = inb & ((key ^ _SIGN) >= (prefix ^ _SIGN))
        q = tl.maximum(tl.load(q_ptr + r.to(tl.int64) * V + offs, mask=inb, other=1.0), 1e-30)
        v = tl.where(kept, tl.div_rn(w, q), -1.0)
        nan = v != v  # torch.argmax's rule: the first NaN is the maximum
        i_nan = tl.min(tl.where(nan, offs, _BIG), axis=0)
        best = tl.max(tl.where(nan, -1.0, v), axis=0)
        i = tl.min(tl.where(v == best, offs, _BIG), axis=0)
        i = tl.where(i_nan < _BIG, i_nan, i)
        best = tl.where(i_nan < _BIG, float("nan"), best)
        tl.store(best_ptr + r * NC + c, best)
        tl.store(arg_ptr + r * NC + c, i)


@triton.jit
def _merge(best_ptr, arg_ptr, tok_ptr, B, NC, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    mk = (rows[:, None] < B) & (cols[None, :] < NC)
    o = rows[:, None] * NC + cols[None, :]
    v = tl.load(best_ptr + o, mask=mk, other=-1.0)
    i = tl.load(arg_ptr + o, mask=mk, other=_BIG)
    i_nan = tl.min(tl.where(v != v, i, _BIG), axis=1)  # chunks in order: the first NaN overall
    best = tl.max(tl.where(v != v, -1.0, v), axis=1)
    tok = tl.min(tl.where(v == best[:, None], i, _BIG), axis=1)
    tok = tl.where(i_nan < _BIG, i_nan, tok)
    tl.store(tok_ptr + rows, tok.to(tl.int64), mask=rows < B)


def _select(x, T_div, top_p, min_p, row_max, block, q):
    """Run the rounds (and with ``q`` the race): (cutoff keys [B] int32, race winner value and index per
    chunk)."""
    if (
        not isinstance(x, torch.Tensor)
        or x.dim() != 2
        or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)
    ):
        raise ValueError(
            f"logits must be a [batch, vocab] float32/float16/bfloat16 tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    B, V = x.shape
    if B == 0 or V == 0 or V >= _BIG.value:
        raise ValueError(f"logits must be non-empty with fewer than 2**31 - 1 tokens, got {tuple(x.shape)}")
    if not 0.0 < top_p <= 1.0 or not 0.0 <= min_p < 1.0:
        raise ValueError(f"need 0 < top_p <= 1 and 0 <= min_p < 1, got top_p={top_p}, min_p={min_p}")
    for name, t in (("T_div", T_div), ("row_max", row_max)):
        if t is not None and (t.shape != (B,) or t.dtype != torch.float32 or t.device != x.device):
            raise ValueError(
                f"{name} must be a float32 [{B}] tensor on {x.device}, got {t.dtype} {tuple(t.shape)}"
            )
    if x.stride(1) != 1:
        x = x.contiguous()
    block = chunk_size(V) if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if row_max is None:
        row_max = x.amax(-1).float()
    key_bits = 32 if x.dtype == torch.float32 else 16
    rounds = 0 if top_p >= 1.0 else key_bits // 4
    nc = triton.cdiv(V, block)
    dev = x.device
    part = torch.empty(max(rounds, 1), B, nc, 16, dtype=torch.float32, device=dev)
    pre = torch.empty(rounds + 1, B, dtype=torch.int32, device=dev)  # pre[R] written by round R
    low = torch.empty(rounds + 1, B, dtype=torch.float32, device=dev)
    thr = torch.empty(B, dtype=torch.float32, device=dev)
    best = torch.empty(B, nc, dtype=torch.float32, device=dev)
    arg = torch.empty(B, nc, dtype=torch.int32, device=dev)
    log_min_p = math.log(min_p) if min_p > 0 else -math.inf
    for R in range(rounds + 1):
        last = R == rounds
        _round[(1 if last and q is None else nc, B)](
            x, x.stride(0), V, T_div, row_max, log_min_p, 1.0 - top_p,
            best if q is None else q, part, pre, low, thr, best, arg, B, nc,
            R=R, NR=rounds, KEY_BITS=key_bits, BLOCK=block, BLOCK_C=triton.next_power_of_2(nc),
            RACE=q is not None, num_warps=4 if block <= 2048 else 8,
        )  # fmt: skip
    return pre[rounds], best, arg


def sample(
    x: torch.Tensor,
    T_div: torch.Tensor,
    top_p: float,
    min_p: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    row_max: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Tokens [B] long: one exponential-race draw per row from the min-p / top-p distribution of
    ``x`` [B, V] / ``T_div`` [B] (float32, > 0). ``row_max`` [B]: max of each row of x when the caller has
    it (the fused sampler's entropy pass does). ``block`` overrides the vocabulary chunk (a power of two >=
    16)."""
    B, V = x.shape if isinstance(x, torch.Tensor) and x.dim() == 2 else (0, 0)
    q = torch.empty(B, V, dtype=torch.float32, device=x.device).exponential_(generator=generator)
    _, best, arg = _select(x, T_div, top_p, min_p, row_max, block, q)
    tok = torch.empty(B, dtype=torch.long, device=x.device)
    nc = best.shape[1]
    bb = min(16, triton.next_power_of_2(B))
    _merge[(triton.cdiv(B, bb),)](best, arg, tok, B, nc, BLOCK_B=bb, BLOCK_C=triton.next_power_of_2(nc))
    return tok


def top_p_cutoff(
    x: torch.Tensor,
    T_div: torch.Tensor,
    top_p: float,
    min_p: float = 0.0,
    *,
    row_max: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The smallest scaled logit z = x / T_div that :func:`sample` keeps, per row (float32 [B]; kept:
    z >= it). The most likely token is always kept; top_p = 1 leaves min-p's floor (-inf without it)."""
    key, _, _ = _select(x, T_div, top_p, min_p, row_max, block, None)
    if top_p >= 1.0:  # no rounds: min-p's floor alone
        floor = (x.amax(-1).float() if row_max is None else row_max) / T_div
        return floor + (math.log(min_p) if min_p > 0 else -math.inf)
    if x.dtype == torch.float32:  # the key of z itself
        s = key ^ -(2**31)
        return torch.where(s < 0, s ^ 0x7FFFFFFF, s).view(torch.float32)
    s = ((key ^ 0x8000) & 0xFFFF).to(torch.int16)  # the key of x
    return torch.where(s < 0, s ^ 0x7FFF, s).view(x.dtype).float() / T_div
