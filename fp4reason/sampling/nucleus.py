"""Top-p + min-p sampling on the GPU without sorting the vocabulary: a radix select on probability mass.

The nucleus of :func:`sampler.top_p_mask` (Hugging Face's TopPLogitsWarper rule) keeps the scaled logits
z >= c, where c is the smallest z whose ascending cumulative probability exceeds 1 - top_p. Sorting 152k
logits per step cost ~0.2 ms of a ~2.6 ms batch-1 decode step (H200); c is found here digit by digit instead.
Each round sums, per vocabulary chunk, the unnormalized mass exp(z - max z) of the tokens that share the
digits chosen so far, split 16 ways by the next 4 bits of an order-preserving integer key; the row's last
chunk to arrive merges the chunks' bins (in a fixed order: the same result on every call) and picks the bin
where the cumulative mass crosses the threshold. bf16 logits need 4 rounds (the 16-bit key of the logit
itself: x -> x / T is injective there, so it orders and ties like z), float16 / float32 logits 8 (the key of
z). One more launch draws the exponential race argmax p / q over the kept tokens; its last chunk writes the
token. The launches are the rounds plus one, with no sort, no host sync and shapes fixed by (B, V): the
whole draw can be captured in a CUDA graph.

Given the same exponential draws ``q`` (``torch.empty(B, V).exponential_(generator)``, as the torch path draws
them), the token is the torch path's unless a token's cumulative mass lies within float32 rounding of the
threshold (the two sum in different orders).
"""

import math

import torch
import triton
import triton.language as tl

_BIG = tl.constexpr(2**31 - 1)
_SIGN = tl.constexpr(-(2**31))


@triton.jit
def _ordered_key(v):
    """Unsigned-ordered int32 bit pattern of float32 v (as an int32: compare keys after ^ _SIGN); -0 is +0
    (torch ties them)."""
    i = v.to(tl.int32, bitcast=True)
    i = tl.where(v == 0.0, 0, i)
    return tl.where(i < 0, i ^ 0x7FFFFFFF, i) ^ _SIGN


@triton.jit
def _round(
    x_ptr, stride_x, V, tdiv_ptr, max_ptr, log_min_p, keep_frac, q_ptr,
    part_ptr, cnt_ptr, pre_ptr, low_ptr, thr_ptr, best_ptr, arg_ptr, tok_ptr, B, NC,
    R: tl.constexpr, NR: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
    RACE: tl.constexpr,
):  # fmt: skip
    """Round R < NR: this chunk's masses by digit R among the tokens whose higher digits are pre[R]; the
    row's last program to arrive merges the chunks and writes pre[R + 1] and low[R + 1]. R == NR with RACE:
    this chunk's race winner among the tokens with key >= pre[NR]; the last program writes the row's token.
    The arrival counters cnt [NR + 1, B] start at zero and are left at zero (CUDA-graph safe)."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    bins = tl.arange(0, 16)
    prefix = 0
    if R > 0:
        prefix = tl.load(pre_ptr + R * B + r)

    offs = c * BLOCK + tl.arange(0, BLOCK)
    inb = offs < V
    x = tl.load(x_ptr + r.to(tl.int64) * stride_x + offs, mask=inb, other=float("-inf"))
    T = tl.load(tdiv_ptr + r)
    xf = x.to(tl.float32)
    z = tl.div_rn(xf, T)  # IEEE, as torch divides (Triton's / is approximate)
    zmax = tl.div_rn(tl.load(max_ptr + r).to(tl.float32), T)
    w = tl.where(inb & (z >= zmax + log_min_p), tl.exp(z - zmax), 0.0)
    key = _ordered_key(xf if KEY_BITS == 16 else z)  # bf16: the top 16 bits of x's key are all of it
    cnt = cnt_ptr + R * B + r
    if R < NR:
        shift: tl.constexpr = 32 - 4 * (R + 1)
        if R > 0:
            w = tl.where(((key >> (shift + 4)) & ((1 << (4 * R)) - 1)) == prefix, w, 0.0)
        hit = bins[:, None] == ((key >> shift) & 15)[None, :]  # [16, BLOCK]: [BLOCK, 16] spills on bf16 loads
        part = part_ptr + (R * B + r) * NC * 16
        tl.store(part + c * 16 + bins, tl.sum(tl.where(hit, w[None, :], 0.0), axis=1))
        tl.debug_barrier()  # every thread's bins are written before this program counts as arrived
        if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == NC - 1:  # the row's last chunk: merge
            pc = tl.arange(0, BLOCK_C)
            # .cg: other SMs wrote these; read them from L2, never from a stale L1 line
            ptrs = part + pc[:, None] * 16 + bins[None, :]
            h = tl.sum(tl.load(ptrs, mask=pc[:, None] < NC, other=0.0, cache_modifier=".cg"), axis=0)
            if R == 0:
                thr = keep_frac * tl.sum(h, axis=0)
                low = 0.0
                tl.store(thr_ptr + r, thr)
            else:
                thr = tl.load(thr_ptr + r)
                low = tl.load(low_ptr + R * B + r)
            crossed = (low + tl.cumsum(h, axis=0)) > thr
            b = tl.min(tl.where(crossed, bins, 16), axis=0)
            # never past the last bin with mass: rounding must not drop the most likely token
            b = tl.maximum(tl.minimum(b, tl.max(tl.where(h > 0.0, bins, -1), axis=0)), 0)
            tl.store(low_ptr + (R + 1) * B + r, low + tl.sum(tl.where(bins < b, h, 0.0), axis=0))
            tl.store(pre_ptr + (R + 1) * B + r, (prefix << 4) | b)
            tl.store(cnt, 0)
    elif RACE:
        kept = inb
        if NR > 0:
            cut_shift: tl.constexpr = 32 - 4 * NR
            kept = kept & ((key ^ _SIGN) >= ((prefix << cut_shift) ^ _SIGN))
        q = tl.maximum(tl.load(q_ptr + r.to(tl.int64) * V + offs, mask=inb, other=1.0), 1e-30)
        v = tl.where(kept, tl.div_rn(w, q), -1.0)
        best, i = _first_max(v, offs)
        tl.store(best_ptr + r * NC + c, best)
        tl.store(arg_ptr + r * NC + c, i)
        tl.debug_barrier()
        if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == NC - 1:
            pc = tl.arange(0, BLOCK_C)
            m = pc < NC
            vs = tl.load(best_ptr + r * NC + pc, mask=m, other=-1.0, cache_modifier=".cg")
            idx = tl.load(arg_ptr + r * NC + pc, mask=m, other=_BIG, cache_modifier=".cg")
            _, tok = _first_max(vs, idx)  # chunks in index order: the first maximum overall
            tl.store(tok_ptr + r, tok.to(tl.int64))
            tl.store(cnt, 0)


@triton.jit
def _first_max(v, idx):
    """(max, smallest idx attaining it) with torch.argmax's rule that a NaN is the maximum."""
    nan = v != v
    i_nan = tl.min(tl.where(nan, idx, _BIG), axis=0)
    best = tl.max(tl.where(nan, -1.0, v), axis=0)
    i = tl.min(tl.where(v == best, idx, _BIG), axis=0)
    has_nan = i_nan < _BIG
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, i_nan, i)


MAX_ROUNDS = 8  # float32 keys: 32 bits, 4 per round


def counters(batch: int, device) -> torch.Tensor:
    """Zeroed arrival counters for :func:`sample` at this batch size; the kernels leave them at zero, so
    one buffer serves every call (and every replay of a captured graph)."""
    return torch.zeros(MAX_ROUNDS + 1, batch, dtype=torch.int32, device=device)


def block_size(vocab: int) -> int:
    """Vocabulary chunk per program: <= ~96 programs per row, at most 2048 (a 152k vocabulary: 75 x 2048)."""
    return min(2048, max(16, triton.next_power_of_2(triton.cdiv(vocab, 96))))


def _select(x, T_div, top_p, min_p, row_max, block, cnt, race: bool, generator=None):
    """Run the rounds, then with ``race`` the draw: (tokens [B] long or None, cutoff keys pre[rounds] [B])."""
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
    dev = x.device
    if cnt is None:
        cnt = counters(B, dev)
    elif cnt.shape != (MAX_ROUNDS + 1, B) or cnt.dtype != torch.int32 or cnt.device != dev:
        raise ValueError(f"counters must be counters({B}, {dev}): int32 [{MAX_ROUNDS + 1}, {B}] zeros")
    if x.stride(1) != 1:
        x = x.contiguous()
    block = block_size(V) if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if row_max is None:
        row_max = x.amax(-1).float()
    key_bits = 16 if x.dtype == torch.bfloat16 else 32
    rounds = 0 if top_p >= 1.0 else key_bits // 4
    nc = triton.cdiv(V, block)
    part = torch.empty(max(rounds, 1), B, nc, 16, dtype=torch.float32, device=dev)
    pre = torch.empty(rounds + 1, B, dtype=torch.int32, device=dev)  # pre[R] written by round R - 1
    low = torch.empty(rounds + 1, B, dtype=torch.float32, device=dev)
    thr = torch.empty(B, dtype=torch.float32, device=dev)
    best = torch.empty(B, nc, dtype=torch.float32, device=dev)
    arg = torch.empty(B, nc, dtype=torch.int32, device=dev)
    tok = torch.empty(B, dtype=torch.long, device=dev)
    log_min_p = math.log(min_p) if min_p > 0 else -math.inf
    q = torch.empty(B, V, dtype=torch.float32, device=dev).exponential_(generator=generator) if race else best
    for R in range(rounds + int(race)):
        _round[(nc, B)](
            x, x.stride(0), V, T_div, row_max, log_min_p, 1.0 - top_p, q,
            part, cnt, pre, low, thr, best, arg, tok, B, nc,
            R=R, NR=rounds, KEY_BITS=key_bits, BLOCK=block, BLOCK_C=triton.next_power_of_2(nc),
            RACE=race, num_warps=8 if block >= 1024 else 4,
        )  # fmt: skip
    return (tok if race else None), pre[rounds]


def sample(
    x: torch.Tensor,
    T_div: torch.Tensor,
    top_p: float,
    min_p: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    row_max: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Tokens [B] long: one exponential-race draw per row from the min-p / top-p distribution of
    ``x`` [B, V] / ``T_div`` [B] (float32, > 0). ``row_max`` [B]: max of each row of x when the caller has
    it (the fused sampler's entropy pass does). ``counters``: a buffer from :func:`counters` to reuse (else
    one is zeroed per call). ``block`` overrides the vocabulary chunk (a power of two >= 16)."""
    return _select(x, T_div, top_p, min_p, row_max, block, counters, True, generator)[0]


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
    if top_p >= 1.0:  # no rounds: min-p's floor alone
        _select(x, T_div, top_p, min_p, row_max, block, None, False)  # the input checks
        floor = (x.amax(-1).float() if row_max is None else row_max) / T_div
        return floor + (math.log(min_p) if min_p > 0 else -math.inf)
    _, key = _select(x, T_div, top_p, min_p, row_max, block, None, False)
    if x.dtype != torch.bfloat16:  # the key of z itself
        s = key ^ -(2**31)
        return torch.where(s < 0, s ^ 0x7FFFFFFF, s).view(torch.float32)
    s = ((key ^ 0x8000) & 0xFFFF).to(torch.int16)  # the top 16 bits of the key of x
    return torch.where(s < 0, s ^ 0x7FFF, s).view(torch.bfloat16).float() / T_div
