"""The fused Triton decode attention (fp4reason.engine.attention) against float64 references and the engine's
SDPA path.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set before the
first kernel is decorated); with CUDA the same tests run the compiled kernels on the GPU, plus the
GPU-marked ones (CUDA graphs, kernel counts, long contexts).
"""

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from conftest import tiny_config, tiny_model  # noqa: E402

from fp4reason.engine import Engine  # noqa: E402
from fp4reason.engine import attention as A  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")


def _rope_tables(n: int, d: int, dtype, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = torch.arange(n, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)


def _case(b, h, hkv, d, s_max, dtype, norm: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(DEV)  # noqa: E731
    qkv = r(b, (h + 2 * hkv) * d)
    kc, vc = r(b + 1, hkv, s_max, d), r(b + 1, hkv, s_max, d)  # one spare row: must stay untouched
    qw = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEV) if norm else None
    kw = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEV) if norm else None
    return qkv, kc, vc, qw, kw


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# Triton 3.6's interpreter gets bf16 wrong (tl.dot returns garbage, casts truncate): bf16 runs on the GPU only
NEEDS_GPU_FOR_BF16 = pytest.mark.skipif(not CUDA, reason="bf16 is broken in the Triton interpreter")
BF16 = pytest.param(torch.bfloat16, marks=NEEDS_GPU_FOR_BF16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize(
    "h,hkv,d,norm,splits",
    [(4, 2, 16, True, 1), (8, 2, 32, False, 3), (4, 4, 64, True, None), (8, 2, 32, True, 4)],
)
def test_fused_kernel_matches_float64(dtype, h, hkv, d, norm, splits):
    """GQA and MHA, left padding (a row with one cached token), 1 / several / automatic KV splits; 4 splits
    of the 4 blocks is the one-block-per-program path (K/V loaded before q)."""
    b, s_max, kv_len, slot = 3, 80, 64, 45
    start = torch.tensor([0, 17, slot - 1], device=DEV)
    qkv, kc, vc, qw, kw = _case(b, h, hkv, d, s_max, dtype, norm)
    cos, sin = _rope_tables(s_max, d, dtype)
    kw_ = dict(n_heads=h, n_kv=hkv, scale=d**-0.5, cos=cos, sin=sin, q_norm=qw, k_norm=kw, eps=1e-6)
    ref, k_new, v_new = A.decode_attention_reference(qkv.cpu(), kc.cpu(), vc.cpu(), slot, start.cpu(), **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw_.items()
    })  # fmt: skip
    k0, v0 = kc.clone(), vc.clone()
    out = A.decode_attention(
        qkv, kc, vc, torch.tensor([slot], device=DEV), start, kv_len=kv_len, splits=splits, **kw_
    )
    tol = TOL[dtype]
    assert out.shape == (b, h * d) and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(kc[:b, :, slot].cpu().double(), k_new, atol=tol, rtol=tol)
    assert torch.equal(vc[:b, :, slot].cpu().double(), v_new)  # v is copied, not computed
    keep = torch.ones(s_max, dtype=torch.bool)
    keep[slot] = False
    assert torch.equal(kc[:b, :, keep], k0[:b, :, keep]) and torch.equal(vc[:b, :, keep], v0[:b, :, keep])
    assert torch.equal(kc[b:], k0[b:]) and torch.equal(vc[b:], v0[b:])
    # the padding really matters: the same row without its start offset gives another result
    if splits == 1 and dtype == torch.float32:
        other = A.decode_attention(
            qkv, kc.clone(), vc.clone(), torch.tensor([slot], device=DEV), start * 0, kv_len=kv_len, **kw_
        )
        assert (other[1:] - out[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("early_kv", [True, False])
def test_stale_cache_slots_do_not_leak(monkeypatch, early_kv):
    """Slots outside a row's range (left padding, and from slot on) hold NaN: the output is the reference
    of the clean cache, with K/V loaded early (one static block per program) or after the wait."""
    monkeypatch.setattr(A, "_EARLY_KV", early_kv)
    dtype, h, hkv, d, b, s_max, kv_len, slot = torch.float32, 4, 2, 16, 3, 80, 64, 45
    start = torch.tensor([0, 17, slot - 1], device=DEV)
    qkv, kc, vc, qw, kw = _case(b, h, hkv, d, s_max, dtype, True, seed=1)
    cos, sin = _rope_tables(s_max, d, dtype)
    kw_ = dict(n_heads=h, n_kv=hkv, scale=d**-0.5, cos=cos, sin=sin, q_norm=qw, k_norm=kw, eps=1e-6)
    ref, _, _ = A.decode_attention_reference(qkv.cpu(), kc.cpu(), vc.cpu(), slot, start.cpu(), **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw_.items()
    })  # fmt: skip
    pos = torch.arange(s_max, device=DEV)
    stale = (pos[None, :] < start[:, None]) | (pos[None, :] >= slot)
    for c in (kc, vc):
        c[:b].masked_fill_(stale[:, None, :, None], float("nan"))
    for splits in (4, None):  # 4 splits of 4 blocks: one block per program (the early path); automatic
        out = A.decode_attention(
            qkv, kc, vc, torch.tensor([slot], device=DEV), start, kv_len=kv_len, splits=splits, **kw_
        )
        torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("combine", [True, False])
def test_splits_combined_in_the_kernel(monkeypatch, combine):
    """The last split to arrive combines all splits (two rounds of partials here) and zeroes its counter, so
    preallocated counters serve call after call; the second kernel (combine off) gives the same result."""
    monkeypatch.setattr(A, "_COMBINE", combine)
    monkeypatch.setattr(A, "COMBINE_REGS", 2 * 2 * 16)  # G 2, D 16: 2 splits per round, 3 rounds for 5
    dtype, h, hkv, d, b, s_max, kv_len, slot = torch.float32, 4, 2, 16, 3, 80, 80, 70
    start = torch.tensor([0, 17, slot - 1], device=DEV)
    cos, sin = _rope_tables(s_max, d, dtype)
    counters = torch.zeros(b * hkv + 2, dtype=torch.int32, device=DEV)
    outs = []
    for seed in (2, 3):  # fresh inputs: a combine that did not run would leave the last call's output
        qkv, kc, vc, qw, kw = _case(b, h, hkv, d, s_max, dtype, True, seed=seed)
        kw_ = dict(n_heads=h, n_kv=hkv, scale=d**-0.5, cos=cos, sin=sin, q_norm=qw, k_norm=kw, eps=1e-6)
        ref, _, _ = A.decode_attention_reference(qkv.cpu(), kc.cpu(), vc.cpu(), slot, start.cpu(), **{
            k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw_.items()
        })  # fmt: skip
        out = A.decode_attention(
            qkv,
            kc,
            vc,
            torch.tensor([slot], device=DEV),
            start,
            kv_len=kv_len,
            splits=5,
            counters=counters,
            **kw_,
        )
        torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)
        assert not counters.any()
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="counters"):
        A.decode_attention(
            qkv, kc, vc, torch.tensor([slot], device=DEV), start, kv_len=kv_len, splits=5,
            counters=counters[:4], **kw_,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("splits,combine", [(1, True), (5, True), (1, False), (5, False)])
def test_output_quantized_in_the_kernel(monkeypatch, dtype, splits, combine):
    """``out_global_scale`` (W4A4's o_proj input): the output is exactly ``formats.qdq_nvfp4`` of the plain
    output, combined in the kernel or by the second kernel (one split too: the output comes from partials)."""
    from fp4reason.formats import nvfp4_global_scale, qdq_nvfp4

    monkeypatch.setattr(A, "_COMBINE", combine)
    h, hkv, d, b, s_max, kv_len, slot = 8, 2, 32, 3, 80, 80, 70
    start = torch.tensor([0, 17, slot - 1], device=DEV)
    cos, sin = _rope_tables(s_max, d, dtype)
    qkv, kc, vc, qw, kw = _case(b, h, hkv, d, s_max, dtype, True, seed=4)
    kw_ = dict(
        n_heads=h, n_kv=hkv, scale=d**-0.5, kv_len=kv_len, cos=cos, sin=sin, q_norm=qw, k_norm=kw, eps=1e-6
    )
    args = (torch.tensor([slot], device=DEV), start)
    plain = A.decode_attention(qkv, kc.clone(), vc.clone(), *args, splits=splits, **kw_)
    gs = nvfp4_global_scale(plain.abs().amax().float()) * 2  # the largest blocks' scales clamp at 448
    out = A.decode_attention(qkv, kc.clone(), vc.clone(), *args, splits=splits, out_global_scale=gs, **kw_)
    ref = qdq_nvfp4(plain, gs)
    assert not torch.equal(ref, plain)
    assert torch.equal(out, ref)
    q = qkv[:, : h * d].reshape(b, h, 1, d)  # fused=False (KV4): q final, the caches hold the new slot
    kw2 = dict(n_heads=h, n_kv=hkv, scale=d**-0.5, kv_len=kv_len, fused=False, splits=splits)
    plain = A.decode_attention(q, kc, vc, *args, **kw2)
    assert torch.equal(A.decode_attention(q, kc, vc, *args, out_global_scale=gs, **kw2), qdq_nvfp4(plain, gs))
    with pytest.raises(ValueError, match="out_global_scale"):
        A.decode_attention(qkv, kc, vc, *args, out_global_scale=gs.double(), **kw_)


def _plain_reference(q, kc, vc, slot: int, start, scale: float):
    """Masked softmax attention in float64 over slots start[b]..slot, K/V head j serving query heads j*G.."""
    b, h, _, d = q.shape
    g = h // kc.shape[1]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for r in range(b):
        for i in range(h):
            keys = kc[r, i // g, int(start[r]) : slot + 1].double()
            vals = vc[r, i // g, int(start[r]) : slot + 1].double()
            out[r, i] = torch.softmax(keys @ q[r, i, 0].double() * scale, 0) @ vals
    return out.reshape(b, -1)


@pytest.mark.parametrize(
    "dtype,splits",
    [(torch.float32, None), (torch.float16, 4), pytest.param(torch.bfloat16, 3, marks=NEEDS_GPU_FOR_BF16)],
)
def test_attention_only_kernel_matches_float64(dtype, splits):
    """fused=False (the KV4 path): q is final and the cache already holds the new slot."""
    b, h, hkv, d, s_max, slot = 2, 6, 2, 32, 70, 50
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype).to(DEV)
    kc = torch.randn(b, hkv, s_max, d, generator=g).to(dtype).to(DEV)
    vc = torch.randn(b, hkv, s_max, d, generator=g).to(dtype).to(DEV)
    start = torch.tensor([3, 30], device=DEV)
    k0 = kc.clone()
    out = A.decode_attention(
        q, kc, vc, torch.tensor([slot], device=DEV), start, n_heads=h, n_kv=hkv, scale=0.3, kv_len=64,
        fused=False, splits=splits,
    )  # fmt: skip
    ref = _plain_reference(q.cpu(), kc.cpu(), vc.cpu(), slot, start.cpu(), 0.3)
    torch.testing.assert_close(out.cpu().double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(kc, k0)


def test_partition_covers_the_bucket(monkeypatch):
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    for dev in (torch.device("cpu"), torch.device("cuda")):
        cases = [(1, 8, 256), (1, 8, 8192), (16, 8, 1536), (4, 2, 64), (1, 1, 16), (16, 8, 300)]
        for b, hkv, kv_len in cases:
            for block_n in (None, 64):
                splits, iters, bn = A.partition(b, hkv, kv_len, dev, block_n)
                assert splits * iters * bn >= kv_len  # every slot of the bucket is in some split
                assert (splits - 1) * iters * bn < kv_len  # and no split is empty by construction
                assert iters in (1, 2, 4, 8, 16) and iters < 2 * -(-kv_len // bn)  # no more than needed
                default = 64 if dev.type == "cuda" else 16
                assert bn == (block_n or default) or (block_n is None and bn == 2 * default)


def test_partition_picks_the_h200_sweep_winners(monkeypatch):
    """Qwen3-8B attention (8 KV heads), 132 SMs: in the H200 sweep (results/gpu_h200_s6/attn_sweep), each
    setting named here measured within 0.6 µs of the fastest of 61, except batch 16 at 1.5K context (33.8 vs
    32.3 µs for 8 warps)."""
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    winners = {
        (1, 1024): (16, 1, 64), (1, 1536): (24, 1, 64), (4, 1024): (4, 4, 64), (4, 1536): (6, 4, 64),
        (8, 1024): (2, 8, 64), (8, 1536): (2, 8, 128), (16, 1024): (1, 8, 128), (16, 1536): (3, 8, 64),
    }  # fmt: skip
    for (b, kv_len), want in winners.items():
        assert A.partition(b, 8, kv_len, torch.device("cuda")) == want, (b, kv_len)


def test_bad_inputs():
    qkv, kc, vc, _, _ = _case(2, 4, 2, 16, 32, torch.float32, False)
    cos, sin = _rope_tables(32, 16, torch.float32)
    slot, start = torch.tensor([5], device=DEV), torch.tensor([0, 1], device=DEV)
    kw = dict(n_heads=4, n_kv=2, scale=0.25, kv_len=16, cos=cos, sin=sin)
    with pytest.raises(ValueError, match="fused qkv"):
        A.decode_attention(qkv[:, :-16], kc, vc, slot, start, **kw)
    with pytest.raises(ValueError, match="KV heads"):
        A.decode_attention(qkv, kc, vc, slot, start, **dict(kw, n_kv=4))
    with pytest.raises(ValueError, match="cos/sin"):
        A.decode_attention(qkv, kc, vc, slot, start, **dict(kw, cos=None))
    with pytest.raises(ValueError, match="dtype"):
        A.decode_attention(qkv.double(), kc, vc, slot, start, **kw)
    with pytest.raises(ValueError, match="too small"):
        A.decode_attention(qkv, kc, vc, slot, start, **dict(kw, kv_len=64))
    with pytest.raises(ValueError, match="head_dim"):
        A.decode_attention(qkv, kc[..., :8], vc[..., :8], slot, start, **kw)
    with pytest.raises(ValueError, match="slot"):
        A.decode_attention(qkv, kc, vc, torch.tensor(5, device=DEV), start, **kw)


def _prompts(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _same_as_sdpa(model, prompts, n, **kw):
    model = model.to(DEV)  # on a GPU host the compiled kernels (a CPU model would need the interpreter)
    ref = Engine(model, None, max_batch_size=4, max_seq_len=64, **kw)
    fast = Engine(model, None, max_batch_size=4, max_seq_len=64, attn="triton", kv_bucket=16, **kw)
    a = ref.generate(prompts, max_new_tokens=n, return_entropies=True)
    b = fast.generate(prompts, max_new_tokens=n, return_entropies=True)
    assert [g.token_ids for g in b] == [g.token_ids for g in a]
    ent = lambda gens: torch.tensor([g.entropies for g in gens], dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(ent(b), ent(a), atol=1e-5, rtol=1e-5)
    return a


def test_engine_matches_sdpa(arch):
    """Greedy tokens and entropies equal the SDPA engine's; kv_bucket 16 crosses buckets and KV splits."""
    gens = _same_as_sdpa(tiny_model(arch), _prompts((4, 13, 2)), 8)
    assert len({tuple(g.token_ids) for g in gens}) == 3


def test_engine_kv4_matches_sdpa():
    """KV4 keeps the torch quantize-and-write path; the kernel then reads the cache including the new slot."""
    from fp4reason.quant import quantize_model

    model = quantize_model(tiny_model("qwen3"), "nvfp4-w4a4kv4", [torch.arange(200) % 256], progress=False)
    _same_as_sdpa(model, _prompts((7, 4), seed=3), 10)


def test_w4a4_attention_quantizes_o_proj_input(monkeypatch):
    """With ``fold_act`` the kernel quantizes o_proj's W4A4 input itself: the same tokens and entropies as
    quantizing in o_proj, and one quantization per layer and step fewer (counted on the CPU path)."""
    import fp4reason.engine.model as m
    from fp4reason.quant import quantize_model

    model = quantize_model(tiny_model("qwen3"), "nvfp4-w4a4", [torch.arange(200) % 256], progress=False)
    model = model.to(DEV)
    calls = []
    qdq = m.qdq_nvfp4
    monkeypatch.setattr(m, "qdq_nvfp4", lambda *a: calls.append(1) or qdq(*a))
    runs = []
    for fuse in (False, True):
        monkeypatch.setattr(m, "_ATTN_QUANT", fuse)
        engine = Engine(model, None, max_batch_size=2, max_seq_len=32, attn="triton", kv_bucket=16)
        engine.decoder.ops = m.Ops(fold_act=True)
        calls.clear()
        gens = engine.generate(_prompts((6, 3), seed=5), max_new_tokens=6, return_entropies=True)
        runs.append((gens, len(calls)))
    (plain, n_plain), (fused, n_fused) = runs
    assert [g.token_ids for g in fused] == [g.token_ids for g in plain]
    ent = lambda gens: torch.tensor([g.entropies for g in gens], dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(ent(fused), ent(plain), atol=1e-5, rtol=1e-5)  # GPU: another o_proj kernel
    if DEV.type == "cpu":
        assert torch.equal(ent(fused), ent(plain))
        assert n_plain - n_fused == 5 * len(model.model.layers)  # 5 decode steps after the prefill's token


def test_engine_rejects_triton_without_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if CUDA:
        pytest.skip("the CPU check only")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        Engine(tiny_model("llama"), None, max_batch_size=1, max_seq_len=16, attn="triton")


_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from fp4reason.engine import attention as A

fn = A._kernels()[0]
target = GPUTarget("cuda", 90, 32)
for case in sys.argv[1:]:  # dtype,fused,one_split,early_kv,combine,quant,cubin path
    dtype, fused, one, early, combine, quant, path = case.split(",")
    consts = dict(H=32, HKV=8, G=4, D=128, BLOCK_G=16, BLOCK_D=128, BLOCK_N=64,
                  ITERS=1 if early == "1" else 4, ONE_SPLIT=one == "1", FUSED=fused == "1",
                  HAS_NORM=fused == "1", IEEE=dtype == "fp32", PDL=True, EARLY_KV=early == "1",
                  EARLY_POS=early == "1", COMBINE=combine == "1", G_P2=4, BLOCK_S=32, CHUNK_S=16,
                  QUANT=quant == "1", RECIP=True,
                  KIND={"fp32": 0, "bf16": 1, "fp16": 2}[dtype])
    types = dict(Slot="*i64", Start="*i64", eps="fp32", scale="fp32", SPLITS="i32", KV_LEN="i32", Acc="*fp32",
                 Mx="*fp32", Sm="*fp32", Cnt="*i32", QGS="*fp32")
    sig = {n: "constexpr" if n in consts else types.get(n, "i32" if n.startswith("stride") else "*" + dtype)
           for n in fn.arg_names}
    # what a launch with 16-byte aligned pointers and strides divisible by 16 specializes on
    attrs = {(i,): CUDABackend(target).parse_attr("D") for i, n in enumerate(fn.arg_names)
             if n not in consts and n not in ("eps", "scale", "SPLITS", "KV_LEN")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=dict(num_warps=4))
    assert ".target sm_90" in k.asm["ptx"]
    open(path, "wb").write(k.asm["cubin"])
"""


def test_compiles_for_hopper_without_spills(tmp_path):
    """The interpreter does not check what the GPU compiler needs (types, layouts, registers): compile for an
    H100 here (a subprocess without the interpreter; no GPU needed) and require no register spills."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("triton's CUDA toolchain (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    # dtype, fused, one split, early K/V loads (and early slot / RoPE loads), splits combined in the kernel
    # (two rounds of 16), output quantized (W4A4)
    cases = [
        ("bf16", "1", "1", "0", "0", "0"),
        ("bf16", "1", "0", "0", "1", "0"),
        ("fp16", "0", "0", "0", "1", "1"),
        ("bf16", "1", "0", "1", "1", "1"),
        ("bf16", "1", "0", "0", "0", "0"),
    ]
    cubins = [tmp_path / f"{'-'.join(c)}.cubin" for c in cases]
    args = [",".join((*c, str(p))) for c, p in zip(cases, cubins, strict=True)]
    run = subprocess.run([sys.executable, "-c", _HOPPER, *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    cuobjdump = os.path.join(bin_dir, "cuobjdump")
    for cubin in cubins:
        assert cubin.stat().st_size > 0
        if os.path.exists(cuobjdump):
            usage = subprocess.run(
                [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True
            )
            assert "STACK:0 " in usage.stdout and "LOCAL:0 " in usage.stdout, usage.stdout


# ------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,kv_len", [(1, 4096), (16, 1024), (5, 256)])
def test_cuda_qwen3_8b_shapes(dtype, b, kv_len):
    """Qwen3-8B attention shapes (32/8 heads, head_dim 128), long contexts with automatic splits."""
    h, hkv, d, s_max = 32, 8, 128, kv_len + 64
    slot = kv_len - 3
    start = torch.randint(0, slot // 2, (b,), device=DEV)
    qkv, kc, vc, qw, kw = _case(b, h, hkv, d, s_max, dtype, True, seed=b)
    cos, sin = _rope_tables(s_max, d, dtype, theta=1e6)
    kw_ = dict(n_heads=h, n_kv=hkv, scale=d**-0.5, cos=cos, sin=sin, q_norm=qw, k_norm=kw, eps=1e-6)
    ref, k_new, _ = A.decode_attention_reference(qkv.cpu(), kc.cpu(), vc.cpu(), slot, start.cpu(), **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw_.items()
    })  # fmt: skip
    out = A.decode_attention(qkv, kc, vc, torch.tensor([slot], device=DEV), start, kv_len=kv_len, **kw_)
    torch.testing.assert_close(out.cpu().double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(kc[:b, :, slot].cpu().double(), k_new, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp32", "bf16-kernel", "nvfp4-w4a4kv4"])
def test_cuda_graphs_triton_matches_eager_sdpa(case):
    from fp4reason.quant import quantize_model
    from fp4reason.sampling import SamplerConfig

    if case == "bf16-kernel":  # bf16, head_dim 64, NVFP4 linears through the CUDA kernel
        from transformers import AutoModelForCausalLM

        cfg = tiny_config("qwen3")
        cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        model = quantize_model(model, "nvfp4-w4a16", progress=False)
    elif case == "fp32":
        model = tiny_model("qwen3")
    else:
        model = quantize_model(tiny_model("qwen3"), case, [torch.arange(200) % 256], progress=False)
    model = model.cuda()
    prompts = _prompts((5, 30, 12), seed=6)
    kw = dict(max_new_tokens=60, return_entropies=True)
    eager = Engine(model, None, max_batch_size=4, max_seq_len=128, use_cuda_graphs=False, compile=False)
    fast = Engine(model, None, max_batch_size=4, max_seq_len=128, kv_bucket=16, attn="triton")
    a, b = eager.generate(prompts, **kw), fast.generate(prompts, **kw)
    ea, eb = (torch.tensor([g.entropies for g in x]) for x in (a, b))
    if case == "bf16-kernel":  # bf16 rounding differs between the two attentions: compare until rows diverge
        pairs = [zip(g.token_ids, h.token_ids, strict=False) for g, h in zip(a, b, strict=True)]
        same = [[s == t for s, t in p] for p in pairs]
        n = min(r.index(False) if False in r else len(r) for r in same)  # steps before the first divergence
        assert n >= 8
        torch.testing.assert_close(ea[:, :n], eb[:, :n], atol=0.05, rtol=0.05)
    else:
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        torch.testing.assert_close(ea, eb, atol=1e-4, rtol=1e-4)
    cfg = SamplerConfig(mode="reset", t_low=0.3, tau0=0.5)
    first = fast.generate(prompts, sampler=cfg, max_new_tokens=20, seed=3)  # captures
    again = fast.generate(prompts, sampler=cfg, max_new_tokens=20, seed=3)  # replays
    assert [g.token_ids for g in first] == [g.token_ids for g in again]


@pytest.mark.gpu
def test_cuda_fewer_kernels_per_step():
    """The point of the fused kernel: fewer GPU kernels per decode step than the SDPA path."""
    from fp4reason.sampling import SamplerConfig

    model = tiny_model("qwen3").cuda()
    counts = {}
    for attn in ("sdpa", "triton"):
        engine = Engine(model, None, max_batch_size=1, max_seq_len=512, attn=attn)
        st = engine._batch(SamplerConfig(mode="greedy"), 1)
        st.slot.fill_(300)
        with torch.no_grad():
            engine._step(st, 512)  # warm: compiles
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                engine._step(st, 512)
                torch.cuda.synchronize()
        counts[attn] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    per_layer = (counts["sdpa"] - counts["triton"]) / len(model.model.layers)
    print(f"GPU kernels per step: {counts} ({per_layer:.1f} fewer per layer)")
    assert per_layer >= 2, counts
