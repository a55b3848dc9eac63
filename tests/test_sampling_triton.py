"""The fused Triton ReSET sampler (fp4reason.sampling.fused) against the torch path, step for step.

On a machine without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1 is set before triton
is imported) on CPU tensors; with CUDA the same tests run the compiled kernels on the GPU.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fp4reason.sampling import BatchedSampler, SamplerConfig, StepEntropyState, select_temperature  # noqa: E402
from fp4reason.sampling import fused as fz  # noqa: E402

if not CUDA and not fz.interpreted():  # imported earlier in this process without the interpreter
    fz = importlib.reload(fz)
if not CUDA and not fz.interpreted():
    pytest.skip("no CUDA and TRITON_INTERPRET is switched off", allow_module_level=True)

DEV = torch.device("cuda" if CUDA else "cpu")
NL, DNL = [3], [4, 5, 6]  # "\n"; "\n\n", ".\n\n", "\n\n\n"
INT_STATE = ("step_n", "glob_n", "last", "prev")
FLOAT_STATE = ("win", "win_sum", "step_sum", "glob_sum")


def random_logits(B, V, gen):
    scale = torch.rand(B, 1, generator=gen) * 5 + 0.05  # entropies from ~0 to ~ln V
    return (torch.randn(B, V, generator=gen) * scale).to(DEV)


def stream_tokens(B, V, gen):
    """Newline-heavy tokens: runs of "\\n", composites containing "\\n\\n", and ordinary ids (also >= the
    class table, which maps them to "no class")."""
    r = torch.rand(B, generator=gen)
    other = torch.randint(7, V, (B,), generator=gen)
    tok = torch.where(r < 0.2, 3, torch.where(r < 0.28, torch.randint(4, 7, (B,), generator=gen), other))
    return tok.to(DEV)


def entropy64(x: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x.double(), -1)
    return -torch.special.xlogy(p, p).sum(-1)


def assert_states_equal(a: StepEntropyState, b: StepEntropyState, exact: bool = True):
    for name in INT_STATE + FLOAT_STATE:
        x, y = getattr(a, name), getattr(b, name)
        if exact or name in INT_STATE:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-6, msg=name)


@pytest.mark.parametrize(
    "mode, window, t_low",
    [
        ("reset", 3, 0.2),
        ("reset", 4, 1e-7),  # T_low <= 1e-6: those rows take the argmax in finish()
        ("fixed_threshold", 1, 0.3),
        ("sliding_window", 5, 0.2),
        ("cool_confident_steps", 2, 0.3),
    ],
)
def test_state_and_temperature_bit_identical_given_entropy(mode, window, t_low):
    """Fed the kernel's own H, StepEntropyState.step/record + select_temperature give bit-identical state and
    temperatures, with finished rows (active), late joiners (reset mid-stream), rows at different phases."""
    B, V = 6, 50
    cfg = SamplerConfig(mode=mode, t_low=t_low, t_high=1.0, tau0=1.3, window=window)
    ref = StepEntropyState(B, window, DEV, NL, DNL)
    st = StepEntropyState(B, window, DEV, NL, DNL)
    params = fz.sampler_params(cfg, window, DEV)
    gen = torch.Generator().manual_seed(window * 10 + len(mode))
    seen = dict(boundary=0, long_step=0, t_high=0, t_low=0, greedy_tok=0, inactive=0)
    for i in range(30):
        x = random_logits(B, V, gen)
        active = None if i % 4 == 0 else (torch.rand(B, generator=gen) < 0.75).to(DEV)
        if i in (9, 20):  # late joiners start clean while the other rows are mid-sequence
            rows = (torch.rand(B, generator=gen) < 0.4).to(DEV)
            ref.reset(rows)
            st.reset(rows)
        step_n_before = ref.step_n.clone()
        H, g, T, T_div = fz.entropy_temperature(x, st, mode, params, active, block=64)
        assert torch.equal(g, x.argmax(-1))
        est = ref.step(H, active=active)
        T_ref = select_temperature(mode, H, est, cfg.t_low, cfg.t_high, cfg.tau0)
        assert torch.equal(T, T_ref) and torch.equal(T_div, T_ref.clamp(min=1e-6))
        assert_states_equal(st, ref)

        race = stream_tokens(B, V, gen)
        tok = fz.finish(race, g, T, st, active)
        tok_ref = torch.where(T_ref <= 1e-6, g, race)
        assert torch.equal(tok, tok_ref)
        ref.record(tok_ref, active=active)
        assert_states_equal(st, ref)

        live = torch.ones(B, dtype=torch.bool, device=DEV) if active is None else active
        seen["boundary"] += int(((ref.step_n < step_n_before) & live).sum())
        seen["long_step"] += int((step_n_before >= window).sum())
        seen["t_high"] += int((T == 1.0).sum())
        seen["t_low"] += int((T == T.new_tensor(t_low)).sum())
        seen["greedy_tok"] += int(((T <= 1e-6) & (race != g)).sum())
        seen["inactive"] += int((~live).sum())
    assert all(v > 0 for k, v in seen.items() if k != "greedy_tok"), seen
    assert (seen["greedy_tok"] > 0) == (t_low <= 1e-6), seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_entropy_and_greedy_token_against_float64(dtype):
    """H within float32 rounding of a float64 softmax entropy, and argmax (first of tied maxima) exactly,
    over several vocabulary chunks, a partial last chunk, -inf masks, ties, peaked and flat rows, a strided
    view."""
    gen = torch.Generator().manual_seed(3)
    V = 70
    base = torch.randn(8, V + 9, generator=gen) * torch.tensor([0.01, 0.5, 1, 2, 4, 8, 30, 1])[:, None]
    base[1, 5:60] = -torch.inf  # masked tokens contribute 0
    base[2, :] = -torch.inf
    base[2, 33] = 1.5  # one finite logit: H = 0, argmax 33
    base[3, 17] = base[3, 50] = base[3, :V].max() + 1  # tie in two chunks: the first index wins
    base[4, :V] = 0.25  # flat: H = ln V, argmax 0
    base[7, 40:] = -torch.inf  # whole chunks masked
    x = base.to(DEV, dtype)[:, :V]  # a strided view (row stride V + 9)
    want = entropy64(x.float())
    for block in (16, 32, 128):
        H, g, T, T_div = fz.entropy_temperature(x, block=block)
        assert T is None and T_div is None and H.dtype == torch.float32
        torch.testing.assert_close(H.double(), want, atol=2e-6, rtol=2e-6)
        assert torch.equal(g, x.float().argmax(-1))
    assert H[2] == 0 and g[2] == 33 and g[3] == 17


def test_nan_logits_give_torch_argmax_token():
    """A row with NaN logits (a broken model) gets torch.argmax's token, the first NaN, in range, and a NaN
    entropy; it used to get 2**31 - 1, which crashed the next step's embedding lookup on a device assert."""
    gen = torch.Generator().manual_seed(5)
    V = 70
    x = torch.randn(4, V, generator=gen)
    x[0, 50] = x[0, 3] = float("nan")  # two chunks with NaN (block 16): the first index wins
    x[1, :] = float("nan")
    x[2, 20] = float("nan")
    x[2, 60] = x[2].nan_to_num().max() + 5  # a larger finite logit after the NaN
    x = x.to(DEV)
    for block in (16, 128):
        H, g, _, _ = fz.entropy_temperature(x, block=block)
        assert g.tolist()[:3] == [3, 0, 20] and torch.equal(g, x.argmax(-1)), block
        assert torch.isnan(H[:3]).all() and torch.isfinite(H[3])


@pytest.mark.parametrize(
    "config",
    [
        SamplerConfig(mode="reset", t_low=0.2, tau0=1.2, window=3),
        SamplerConfig(mode="reset", t_low=1e-7, tau0=1.0, window=2),
        SamplerConfig(mode="sliding_window", t_low=0.2, tau0=1.0, window=3),
        SamplerConfig(mode="cool_confident_steps", t_low=0.3, tau0=0.8, window=2),
        SamplerConfig(mode="fixed", temperature=0.7, top_p=0.9),
        SamplerConfig(mode="min_p", temperature=0.8, min_p=0.1),
        SamplerConfig(mode="greedy"),
    ],
    ids=lambda c: c.mode,
)
def test_batched_sampler_fused_matches_torch_path(config):
    """BatchedSampler(fused=True) returns the torch path's tokens and temperatures and keeps its state, over
    sampled and teacher-forced tokens, finished rows and rows restarted mid-batch."""
    B, V = 4, 24  # V > 16: two vocabulary chunks
    a = BatchedSampler(config, B, DEV, NL, DNL, fused=False)
    b = BatchedSampler(config, B, DEV, NL, DNL, fused=True)
    assert b.fused and not a.fused
    gen = torch.Generator().manual_seed(11)
    for i in range(12):
        x = random_logits(B, V, gen)
        active = None if i % 3 == 0 else (torch.rand(B, generator=gen) < 0.7).to(DEV)
        seed = int(torch.randint(0, 2**31, (), generator=gen))
        oa = a(x, torch.Generator(DEV).manual_seed(seed), active)
        ob = b(x, torch.Generator(DEV).manual_seed(seed), active)
        assert torch.equal(oa.tokens, ob.tokens) and torch.equal(oa.temperature, ob.temperature)
        torch.testing.assert_close(ob.entropy, oa.entropy, atol=2e-6, rtol=2e-6)
        if i % 2:
            forced = torch.where(torch.rand(B, generator=gen) < 0.6, stream_tokens(B, V, gen).cpu(), -1)
            a.observe(forced.to(DEV))
            b.observe(forced.to(DEV))
        if i == 6:
            a.reset(torch.tensor([1, 2]))
            b.reset(torch.tensor([1, 2]))
        assert_states_equal(a.state, b.state, exact=False)  # H differs in the last float32 bit


def test_path_selection(monkeypatch):
    """Torch path by default off CUDA; FP4REASON_SAMPLER and the flags choose; contradictions raise."""
    cfg = SamplerConfig()
    make = lambda **kw: BatchedSampler(cfg, 2, DEV, NL, DNL, **kw)  # noqa: E731
    monkeypatch.delenv("FP4REASON_SAMPLER", raising=False)
    assert make().fused == (CUDA and not fz.interpreted())  # auto never picks the interpreter
    assert not make(fused=False).fused and make(fused=True).fused
    assert not make(compile=True).fused
    monkeypatch.setenv("FP4REASON_SAMPLER", "torch")
    assert not make().fused
    monkeypatch.setenv("FP4REASON_SAMPLER", "fused")
    assert make().fused
    monkeypatch.setenv("FP4REASON_SAMPLER", "triton")
    with pytest.raises(ValueError, match="FP4REASON_SAMPLER"):
        make()
    monkeypatch.delenv("FP4REASON_SAMPLER")
    with pytest.raises(ValueError, match="alternatives"):
        make(fused=True, compile=True)
    if not CUDA:
        monkeypatch.setattr(fz, "interpreted", lambda: False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            make(fused=True)


def test_bad_inputs():
    B, V = 3, 20
    cfg = SamplerConfig(window=4)
    st = StepEntropyState(B, 4, DEV, NL, DNL)
    params = fz.sampler_params(cfg, 4, DEV)
    x = torch.randn(B, V, device=DEV)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        fz.entropy_temperature(x[0])
    with pytest.raises(ValueError, match="float32"):
        fz.entropy_temperature(x.long())
    with pytest.raises(ValueError, match="non-empty"):
        fz.entropy_temperature(x[:, :0])
    with pytest.raises(ValueError, match="power of two"):
        fz.entropy_temperature(x, block=24)
    with pytest.raises(ValueError, match="power of two"):
        fz.entropy_temperature(x, block=8)
    with pytest.raises(ValueError, match="active"):
        fz.entropy_temperature(x, st, "reset", params, torch.ones(B + 1, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="active"):
        fz.entropy_temperature(x, st, "reset", params, torch.ones(B, device=DEV))
    with pytest.raises(ValueError, match="holds 5 rows"):
        fz.entropy_temperature(x, StepEntropyState(5, 4, DEV, NL, DNL), "reset", params)
    with pytest.raises(ValueError, match="params"):
        fz.entropy_temperature(x, st, "reset", params.float())
    with pytest.raises(ValueError, match="no step state"):
        fz.entropy_temperature(x, st, "fixed", params)
    g = x.argmax(-1)
    with pytest.raises(ValueError, match="shape"):
        fz.finish(g[:2], g, torch.ones(B, device=DEV), st)
    with pytest.raises(ValueError, match="holds 3 rows"):
        fz.finish(None, g[:2], None, st)
    with pytest.raises(ValueError, match="active"):
        BatchedSampler(cfg, B, DEV, NL, DNL, fused=True)(x, active=torch.ones(B + 1, dtype=torch.bool))
    # nothing above touched the state
    assert not st.glob_n.any() and torch.equal(st.last, torch.full_like(st.last, -1))


@pytest.mark.skipif(
    not (Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
    reason="triton without the NVIDIA backend's ptxas",
)
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (non-constexpr globals, type mixes): compile
    every kernel variant to an sm_90 cubin in a subprocess without TRITON_INTERPRET (no GPU needed)."""
    code = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fp4reason.sampling import fused as fz
assert not fz.interpreted()
tgt = GPUTarget("cuda", 90, 32)
def comp(fn, sig, const):
    sig = dict(sig, **{k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn, sig, const), target=tgt)
    assert "ld.global" in k.asm["ptx"], fn.__name__
    return k.asm["ptx"]
comp(fz._partials, dict(x_ptr="*bf16", stride_x="i32", V="i32", pm_ptr="*fp32", pi_ptr="*i32", ps_ptr="*fp32",
     pt_ptr="*fp32", NC="i32"), dict(BLOCK=2048))
sig = dict(pm_ptr="*fp32", pi_ptr="*i32", ps_ptr="*fp32", pt_ptr="*fp32", NC="i32", B="i32", h_ptr="*fp32",
           g_ptr="*i64", temp_ptr="*fp32", tdiv_ptr="*fp32", code_ptr="*i8", NONE="i32", last_ptr="*i64",
           prev_ptr="*i64", win_ptr="*fp64", win_sum_ptr="*fp64", step_sum_ptr="*fp64", glob_sum_ptr="*fp64",
           step_n_ptr="*i64", glob_n_ptr="*i64", act_ptr="*u8", prm_ptr="*fp64", W="i32")
for mode in range(4):
    const = dict(BLOCK_B=16, BLOCK_C=128, STATEFUL=True, MODE=mode, HAS_ACTIVE=mode % 2 == 1)
    ptx = comp(fz._combine_step, sig, const)
    # float64 state math as torch does it: IEEE division (fixed_threshold uses no mean), no fused multiply-add
    assert (mode == 1 or "div.rn.f64" in ptx) and "fma.rn.f64" not in ptx, mode
comp(fz._combine_step, sig, dict(BLOCK_B=1, BLOCK_C=128, STATEFUL=False, MODE=0, HAS_ACTIVE=False))
sig3 = dict(race_ptr="*i64", g_ptr="*i64", temp_ptr="*fp32", tok_ptr="*i64", last_ptr="*i64", prev_ptr="*i64",
            act_ptr="*u8", B="i32")
for greedy in (False, True):
    comp(fz._finish, sig3, dict(BLOCK_B=16, GREEDY=greedy, HAS_ACTIVE=not greedy))
from fp4reason.sampling import nucleus as nz
sig4 = dict(x_ptr="*bf16", stride_x="i32", V="i32", tdiv_ptr="*fp32", max_ptr="*fp32", log_min_p="fp32",
            keep_frac="fp32", q_ptr="*fp32", part_ptr="*fp32", cnt_ptr="*i32", pre_ptr="*i32",
            low_ptr="*fp32", thr_ptr="*fp32", best_ptr="*fp32", arg_ptr="*i32", tok_ptr="*i64", B="i32",
            NC="i32")
for xt, bits in (("*bf16", 16), ("*fp16", 32), ("*fp32", 32)):
    for R in (0, 1, 2, bits // 4):
        const = dict(R=R, NR=bits // 4, KEY_BITS=bits, BLOCK=2048, BLOCK_C=128, RACE=True)
        ptx = comp(nz._round, dict(sig4, x_ptr=xt), const)
        assert "div.rn.f32" in ptx, (xt, R)  # z = x / T as torch divides
        assert "atom.global.gpu.acq_rel.add" in ptx, (xt, R)  # the row's last chunk merges
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
def test_cuda_fused_matches_torch_and_replays_in_a_graph():
    """On the GPU with a Qwen-size vocabulary: the default sampler is the compiled fused one, it matches the
    torch path, runs without a host sync, and a captured graph replays it step for step."""
    assert not fz.interpreted(), (
        "TRITON_INTERPRET is set in this process: the GPU test needs compiled kernels"
    )
    B, V = 4, 151936
    cfg = SamplerConfig(t_low=0.1, tau0=4.0, window=4)
    torch_path = BatchedSampler(cfg, B, DEV, NL, DNL, validate=False, fused=False)
    eager = BatchedSampler(cfg, B, DEV, NL, DNL, validate=False)
    graphed = BatchedSampler(cfg, B, DEV, NL, DNL, validate=False)
    assert eager.fused and graphed.fused and not torch_path.fused
    static = torch.zeros(B, V, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed(static)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = graphed(static)
    graphed.reset()
    gen = torch.Generator().manual_seed(0)
    temps = set()
    for _ in range(60):
        x = (torch.randn(B, V, generator=gen) * (torch.rand(B, 1, generator=gen) * 8)).to(DEV)  # H 0.3..12
        seed = int(torch.randint(0, 2**31, (), generator=gen))
        ref = torch_path(x, torch.Generator(DEV).manual_seed(seed))
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the sampler raises
        try:
            out = eager(x, torch.Generator(DEV).manual_seed(seed))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.temperature, ref.temperature)
        torch.testing.assert_close(out.entropy, ref.entropy, atol=5e-5, rtol=2e-6)
        static.copy_(x)
        graph.replay()
        assert torch.equal(out_g.entropy, out.entropy) and torch.equal(out_g.temperature, out.temperature)
        assert torch.equal(graphed.state.last, out_g.tokens)
        forced = stream_tokens(B, 200, gen)
        for s in (torch_path, eager, graphed):
            s.observe(forced)
        assert_states_equal(eager.state, torch_path.state, exact=False)
        for name in INT_STATE[:2] + FLOAT_STATE:
            assert torch.equal(getattr(graphed.state, name), getattr(eager.state, name)), name
        temps.update(out.temperature.tolist())
    assert len(temps) == 2  # both temperatures were used
