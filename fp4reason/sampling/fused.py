"""ReSET's per-token work in three Triton launches instead of ~50 tiny torch kernels (issue 4 follow-up).

1. ``_partials`` (grid chunks x rows): each program reduces one vocabulary chunk of the raw logits to
   (max, first argmax, sum e^(x-max), sum e^(x-max)(x-max)); at batch 1 the vocabulary is spread over ~75
   programs instead of one block per row.
2. ``_combine_step`` (one program per BLOCK_B rows): merges the chunks into the entropy H = log S - T/S and
   the greedy token, then, in the ReSET modes, runs ``StepEntropyState.step`` + ``select_temperature`` with
   the same float64 operations in the same order, so state and temperature are bit-identical to the torch
   path given the same H (H itself agrees to float32 rounding: the summation order differs).
3. ``_finish``: the sampled token (rows with T <= 1e-6 take the argmax) and ``StepEntropyState.record``.

No host sync and launch shapes fixed by the batch and vocabulary size, so a CUDA graph captures them. Runs on
CUDA, or on CPU tensors when the kernels were defined under ``TRITON_INTERPRET=1`` (the tests).
"""

import torch
import triton
import triton.language as tl

from .state import StepEntropyState

GREEDY_T = tl.constexpr(1e-6)  # same threshold as sampler.GREEDY_T (kernels may read constexpr globals only)
MODE_IDS = {"reset": 0, "fixed_threshold": 1, "sliding_window": 2, "cool_confident_steps": 3}
_BIG = tl.constexpr(2**31 - 1)


@triton.jit
def _partials(x_ptr, stride_x, V, pm_ptr, pi_ptr, ps_ptr, pt_ptr, NC, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    r = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    inb = offs < V
    x = tl.load(x_ptr + r.to(tl.int64) * stride_x + offs, mask=inb, other=float("-inf")).to(tl.float32)
    # torch.argmax's rule: a NaN is the maximum, the first NaN wins (a NaN never equals the max, so the
    # plain rule left the token at _BIG: an out-of-range id for the next step's embedding lookup)
    nan = x != x
    i_nan = tl.min(tl.where(nan, offs, _BIG), axis=0)
    m = tl.max(tl.where(nan, float("-inf"), x), axis=0)
    i = tl.min(tl.where((x == m) & inb, offs, _BIG), axis=0)
    i = tl.where(i_nan < _BIG, i_nan, i)
    m = tl.where(i_nan < _BIG, float("nan"), m)
    d = x - tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(d)  # -inf logits give 0
    s = tl.sum(e, axis=0)
    t = tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=0)  # 0 * -inf would be NaN
    o = r * NC + c
    tl.store(pm_ptr + o, m)
    tl.store(pi_ptr + o, i)
    tl.store(ps_ptr + o, s)
    tl.store(pt_ptr + o, t)


@triton.jit
def _combine_step(
    pm_ptr, pi_ptr, ps_ptr, pt_ptr, NC, B,
    h_ptr, g_ptr, temp_ptr, tdiv_ptr,
    code_ptr, NONE, last_ptr, prev_ptr,
    win_ptr, win_sum_ptr, step_sum_ptr, glob_sum_ptr, step_n_ptr, glob_n_ptr,
    act_ptr, prm_ptr, W, max_ptr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, STATEFUL: tl.constexpr, MODE: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, STORE_MAX: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    cols = tl.arange(0, BLOCK_C)
    o = rows[:, None] * NC + cols[None, :]
    mk = rm[:, None] & (cols[None, :] < NC)
    m = tl.load(pm_ptr + o, mask=mk, other=float("-inf"))
    s = tl.load(ps_ptr + o, mask=mk, other=0.0)
    t = tl.load(pt_ptr + o, mask=mk, other=0.0)
    i = tl.load(pi_ptr + o, mask=mk, other=_BIG)
    M = tl.max(m, axis=1)
    live = m > float("-inf")
    dm = tl.where(live, m - tl.where(M == float("-inf"), 0.0, M)[:, None], 0.0)
    f = tl.where(live, tl.exp(dm), 0.0)
    S = tl.sum(f * s, axis=1)
    S1 = tl.where(S > 0.0, S, 1.0)  # S = 0: an all -inf row (or a padding row); torch gives NaN there
    H = tl.where(S > 0.0, tl.log(S1) - tl.sum(f * (t + dm * s), axis=1) / S1, float("nan"))
    g = tl.min(tl.where(mk & (m == M[:, None]), i, _BIG), axis=1)
    g_nan = tl.min(tl.where(mk & (m != m), i, _BIG), axis=1)  # chunks in order: the first NaN overall
    g = tl.where(g_nan < _BIG, g_nan, g)
    tl.store(h_ptr + rows, H, mask=rm)
    tl.store(g_ptr + rows, g.to(tl.int64), mask=rm)
    if STORE_MAX:
        tl.store(max_ptr + rows, M, mask=rm)
    if STATEFUL:
        # StepEntropyState.step, same float64 operations in the same order
        last = tl.load(last_ptr + rows, mask=rm, other=-1)
        prev = tl.load(prev_ptr + rows, mask=rm, other=-1)
        cl = tl.load(code_ptr + tl.where((last < 0) | (last > NONE), NONE, last), mask=rm, other=0)
        cp = tl.load(code_ptr + tl.where((prev < 0) | (prev > NONE), NONE, prev), mask=rm, other=0)
        boundary = (cl == 2) | ((cl == 1) & (cp == 1))
        step_sum = tl.where(boundary, 0.0, tl.load(step_sum_ptr + rows, mask=rm, other=0.0))
        step_n = tl.where(boundary, 0, tl.load(step_n_ptr + rows, mask=rm, other=0))
        glob_sum = tl.load(glob_sum_ptr + rows, mask=rm, other=0.0)
        glob_n = tl.load(glob_n_ptr + rows, mask=rm, other=0)
        win_sum = tl.load(win_sum_ptr + rows, mask=rm, other=0.0)
        tau0 = tl.load(prm_ptr)
        t_low = tl.load(prm_ptr + 1).to(tl.float32)
        t_high = tl.load(prm_ptr + 2).to(tl.float32)
        inv_w = tl.load(prm_ptr + 3)

        H64 = H.to(tl.float64)
        first = glob_n == 0
        glob_mean = glob_sum / tl.maximum(glob_n, 1).to(tl.float64)
        win_mean = tl.where(glob_n <= W, glob_mean, win_sum * inv_w)
        step_mean = tl.where(step_n < W, win_mean, step_sum / tl.maximum(step_n, 1).to(tl.float64))
        est_step = tl.where(first, H64, step_mean)
        est_win = tl.where(first, H64, win_mean)
        mean = tl.where(first, est_step, glob_mean)

        # select_temperature
        if MODE == 1:
            tau = tl.zeros_like(H64) + tau0
        elif MODE == 2:
            tau = tl.where(est_win > mean, est_win, tau0)
        else:
            tau = tl.where(est_step > mean, est_step, tau0)
        temp = tl.where(H64 >= tau, t_high, t_low)
        if MODE == 3:
            temp = tl.where(est_step > mean, temp, t_low)
        tl.store(temp_ptr + rows, temp, mask=rm)
        tl.store(tdiv_ptr + rows, tl.maximum(temp, GREEDY_T), mask=rm)

        flat = rows * W + glob_n % W
        old = tl.load(win_ptr + flat, mask=rm, other=0.0)
        new_win = H64
        new_win_sum = win_sum + H64 - old
        new_step_sum = step_sum + H64
        new_step_n = step_n + 1
        new_glob_sum = glob_sum + H64
        new_glob_n = glob_n + 1
        if HAS_ACTIVE:
            a = tl.load(act_ptr + rows, mask=rm, other=0) != 0
            new_win = tl.where(a, new_win, old)
            new_win_sum = tl.where(a, new_win_sum, win_sum)
            new_step_sum = tl.where(a, new_step_sum, step_sum)
            new_step_n = tl.where(a, new_step_n, step_n)
            new_glob_sum = tl.where(a, new_glob_sum, glob_sum)
            new_glob_n = tl.where(a, new_glob_n, glob_n)
        tl.store(win_ptr + flat, new_win, mask=rm)
        tl.store(win_sum_ptr + rows, new_win_sum, mask=rm)
        tl.store(step_sum_ptr + rows, new_step_sum, mask=rm)
        tl.store(step_n_ptr + rows, new_step_n, mask=rm)
        tl.store(glob_sum_ptr + rows, new_glob_sum, mask=rm)
        tl.store(glob_n_ptr + rows, new_glob_n, mask=rm)


@triton.jit
def _finish(
    race_ptr, g_ptr, temp_ptr, tok_ptr, last_ptr, prev_ptr, act_ptr, B,
    BLOCK_B: tl.constexpr, GREEDY: tl.constexpr, HAS_ACTIVE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    g = tl.load(g_ptr + rows, mask=rm, other=0)
    if GREEDY:
        tok = g
    else:
        temp = tl.load(temp_ptr + rows, mask=rm, other=1.0)
        tok = tl.where(temp <= GREEDY_T, g, tl.load(race_ptr + rows, mask=rm, other=0))
    tl.store(tok_ptr + rows, tok, mask=rm)
    # StepEntropyState.record: prev <- last <- tok where active
    last = tl.load(last_ptr + rows, mask=rm, other=-1)
    new_prev = last
    new_last = tok
    if HAS_ACTIVE:
        a = tl.load(act_ptr + rows, mask=rm, other=0) != 0
        new_prev = tl.where(a, last, tl.load(prev_ptr + rows, mask=rm, other=-1))
        new_last = tl.where(a, tok, last)
    tl.store(last_ptr + rows, new_last, mask=rm)
    tl.store(prev_ptr + rows, new_prev, mask=rm)


def interpreted() -> bool:
    """True if these kernels run in the Triton interpreter (CPU tensors, no graphs, slow)."""
    return not isinstance(_partials, triton.runtime.JITFunction)


def chunk_size(vocab: int) -> int:
    """Vocabulary chunk per program: ~64-128 chunks per row (2048 for a 152k vocabulary)."""
    return min(8192, max(16, triton.next_power_of_2(triton.cdiv(vocab, 96))))


def sampler_params(config, window: int, device) -> torch.Tensor:
    """float64 [4] (tau0, t_low, t_high, 1/window) on ``device``: built once, read by the kernel (a float
    kernel argument would be rounded to float32, and tau0 is compared in float64 on the torch path)."""
    return torch.tensor(
        [config.tau0, config.t_low, config.t_high, 1.0 / window], dtype=torch.float64, device=device
    )


def _block_b(b: int) -> int:
    return min(16, triton.next_power_of_2(b))


def _check_active(active, b: int, device) -> torch.Tensor | None:
    if active is None:
        return None
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.shape != (b,):
        raise ValueError(
            f"active must be a bool tensor of shape [{b}], got {getattr(active, 'shape', active)}"
        )
    if active.device != device:
        raise ValueError(f"active is on {active.device}, logits on {device}")
    return active.contiguous().view(torch.uint8)


def entropy_temperature(
    x: torch.Tensor,
    state: StepEntropyState | None = None,
    mode: str = "reset",
    params: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    *,
    block: int | None = None,
    row_max: torch.Tensor | None = None,
):
    """Raw-logit entropy H [B] f32 and greedy token [B] long of logits ``x`` [B, V]; with a ``state``, also
    the ReSET temperature T [B] f32 (and max(T, 1e-6), the divisor) while advancing the state in place.

    Returns (H, greedy, T, T_div); T and T_div are None without a state. ``params`` comes from
    :func:`sampler_params`; ``block`` overrides the vocabulary chunk (a power of two >= 16, for tests).
    ``row_max``, a float32 [B] tensor, receives each row's max logit (the nucleus sampler's input).
    """
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
    if B == 0 or V == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(x.shape)}")
    if V >= _BIG.value:
        raise ValueError(f"vocabulary of {V} does not fit the int32 token index")
    if x.stride(1) != 1:
        x = x.contiguous()
    dev = x.device
    block = chunk_size(V) if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    act = _check_active(active, B, dev)
    if row_max is not None and (
        row_max.shape != (B,) or row_max.dtype != torch.float32 or row_max.device != dev
    ):
        raise ValueError(f"row_max must be a float32 [{B}] tensor on {dev}")
    if state is not None:
        if mode not in MODE_IDS:
            raise ValueError(f"mode {mode!r} has no step state; expected one of {tuple(MODE_IDS)}")
        if state.capacity != B:
            raise ValueError(f"logits have batch {B}, the state holds {state.capacity} rows")
        if state.win.device != dev:
            raise ValueError(f"state is on {state.win.device}, logits on {dev}")
        if params is None or params.shape != (4,) or params.dtype != torch.float64 or params.device != dev:
            raise ValueError("params must be the float64 [4] sampler_params() tensor on the logits' device")
    nc = triton.cdiv(V, block)
    pm, ps, pt = torch.empty(3, B, nc, dtype=torch.float32, device=dev)
    pi = torch.empty(B, nc, dtype=torch.int32, device=dev)
    _partials[(nc, B)](
        x, x.stride(0), V, pm, pi, ps, pt, nc, BLOCK=block, num_warps=4 if block <= 2048 else 8
    )

    H, T, T_div = torch.empty(3, B, dtype=torch.float32, device=dev)
    g = torch.empty(B, dtype=torch.long, device=dev)
    bb = _block_b(B)
    if state is None:
        _combine_step[(triton.cdiv(B, bb),)](
            pm, pi, ps, pt, nc, B, H, g, H, H,
            pm, 0, g, g, pm, pm, pm, pm, g, g, pi, pm, 1, H if row_max is None else row_max,
            BLOCK_B=bb, BLOCK_C=triton.next_power_of_2(nc), STATEFUL=False, MODE=0, HAS_ACTIVE=False,
            STORE_MAX=row_max is not None,
        )  # fmt: skip
        return H, g, None, None
    s = state
    _combine_step[(triton.cdiv(B, bb),)](
        pm, pi, ps, pt, nc, B, H, g, T, T_div,
        s.code, s.code.numel() - 1, s.last, s.prev,
        s.win, s.win_sum, s.step_sum, s.glob_sum, s.step_n, s.glob_n,
        pi if act is None else act, params, s.window, H if row_max is None else row_max,
        BLOCK_B=bb, BLOCK_C=triton.next_power_of_2(nc), STATEFUL=True, MODE=MODE_IDS[mode],
        HAS_ACTIVE=act is not None, STORE_MAX=row_max is not None,
    )  # fmt: skip
    return H, g, T, T_div


def finish(
    race: torch.Tensor | None,
    greedy: torch.Tensor,
    T: torch.Tensor | None,
    state: StepEntropyState,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens [B] long: ``greedy`` where T <= 1e-6 (or everywhere when ``race`` is None), else ``race``;
    records them in ``state`` (prev <- last <- token where ``active``)."""
    B = greedy.shape[0]
    if state.capacity != B:
        raise ValueError(f"batch {B} but the state holds {state.capacity} rows")
    if greedy.dtype != torch.long or (race is not None and race.dtype != torch.long):
        raise ValueError("greedy and race tokens must be int64")
    if race is not None and (race.shape != (B,) or T is None or T.shape != (B,)):
        raise ValueError(f"race tokens and temperatures must have shape [{B}]")
    act = _check_active(active, B, greedy.device)
    tok = torch.empty(B, dtype=torch.long, device=greedy.device)
    bb = _block_b(B)
    _finish[(triton.cdiv(B, bb),)](
        greedy if race is None else race, greedy, greedy if T is None else T, tok,
        state.last, state.prev, greedy if act is None else act, B,
        BLOCK_B=bb, GREEDY=race is None, HAS_ACTIVE=act is not None,
    )  # fmt: skip
    return tok
