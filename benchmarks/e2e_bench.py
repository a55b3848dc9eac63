"""End-to-end decode speed: our engine (BF16, NVFP4 W4A16, NVFP4 W4A4) vs Hugging Face ``generate``.

A Qwen3-8B-shaped model with random weights (built from its config on the GPU), batch 1/4/8/16, a
512-token prompt, 1,024 new tokens, plus one long batch-1 run to 8K tokens. For every run: ms per decode
step, tokens/s, bytes read per step (weights + lm_head + KV at the current length), achieved bandwidth and
the ratio to the byte floor at the device's measured copy bandwidth. Also: ReSET's and the sampler's share of
a batch-1 and a batch-8 step.
Decode attention is the fused Triton kernel (``--attn triton``); ``--compare-attn`` times NVFP4 W4A16 with
SDPA too and counts the GPU kernels per step both ways.

    python benchmarks/e2e_bench.py --out benchmarks/results/e2e_h100.json          # ~6 min on an H100
    python benchmarks/e2e_bench.py --quick --out benchmarks/results/e2e_quick.json  # < 90 s
"""

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4reason.engine import Engine  # noqa: E402
from fp4reason.sampling import PRESETS, SamplerConfig  # noqa: E402

QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
GREEDY = SamplerConfig(mode="greedy")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted), best of 10."""
    src = torch.empty(1 << 29, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best


def build_model(layers: int | None, device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = dict(QWEN3_8B, **({"num_hidden_layers": layers} if layers else {}))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**cfg), dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None  # random weights: decode the full budget
    return model.eval()


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def floor_stats(engine: Engine, batch: int, prompt_len: int, new: int, step_s: float, bw: float) -> dict:
    """Bytes per step averaged over the run (KV read grows with the context) and the byte floor."""
    d = engine.decoder
    kv = d.kv_bytes_per_token() * batch * (prompt_len + new / 2)
    nbytes = d.weight_bytes() + kv
    floor_s = nbytes / bw
    return dict(
        bytes_per_step=nbytes,
        weight_bytes=d.weight_bytes(),
        kv_bytes_avg=kv,
        floor_ms=floor_s * 1e3,
        achieved_GBps=nbytes / step_s / 1e9,
        x_floor=step_s / floor_s,
    )


def engine_run(engine: Engine, batch: int, prompt_len: int, new: int, bw: float, sampler=GREEDY) -> dict:
    ps = prompts(batch, prompt_len, engine.decoder.config.vocab_size)
    engine.warmup(batch, prompt_len + new, sampler)
    engine.generate(ps, sampler=sampler, max_new_tokens=new, seed=0)
    s = engine.stats
    step_s = s["decode_s"] / s["steps"]
    row = dict(
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new,
        prefill_ms=s["prefill_s"] * 1e3,
        ms_per_step=step_s * 1e3,
        tokens_per_s=batch / step_s,
    )
    row.update(floor_stats(engine, batch, prompt_len, new, step_s, bw))
    return row


def long_run(engine: Engine, prompt_len: int, total: int, bw: float, window: int = 1024) -> dict:
    new = total - prompt_len
    ps = prompts(1, prompt_len, engine.decoder.config.vocab_size)
    engine.warmup(1, total, GREEDY)
    engine.generate(ps, max_new_tokens=new, seed=0)
    times = engine.stats["token_times"]
    d = engine.decoder
    rows = []
    for a in range(0, len(times) - 1, window):
        b = min(a + window, len(times) - 1)
        step_s = (times[b] - times[a]) / (b - a)
        ctx = prompt_len + (a + b) / 2
        nbytes = d.weight_bytes() + d.kv_bytes_per_token() * ctx
        rows.append(
            dict(
                context=int(ctx),
                ms_per_step=step_s * 1e3,
                achieved_GBps=nbytes / step_s / 1e9,
                x_floor=step_s * bw / nbytes,
                kv_share=d.kv_bytes_per_token() * ctx / nbytes,
            )
        )
    return dict(prompt_len=prompt_len, total_len=total, windows=rows)


@torch.no_grad()
def gpu_ops_per_step(engine: Engine, batch: int) -> int | None:
    """GPU kernels and copies launched by one eager decode step (what a graph replays), via the profiler."""
    try:
        st = engine._batch(GREEDY, batch)
        st.slot.fill_(engine.kv_bucket - 2)
        engine._step(st, engine.kv_bucket)  # warm
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine._step(st, engine.kv_bucket)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # diagnostics only: never fail the benchmark
        log(f"kernel count failed: {type(e).__name__}: {e}")
        return None


@torch.no_grad()
def hf_run(model, batch: int, prompt_len: int, new: int) -> dict:
    """HF ``generate`` (eager, dynamic cache): ms per decode step from a 1-token and an ``new``-token run."""
    ids = torch.tensor(prompts(batch, prompt_len, model.config.vocab_size), device=model.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)
    t1, tn = timed(1), timed(new)
    step_s = (tn - t1) / (new - 1)
    return dict(
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new,
        ms_per_step=step_s * 1e3,
        tokens_per_s=batch / step_s,
    )


def other_attn(attn: str) -> str:
    """The decode attention to compare with: SDPA, or the math path when SDPA is the one under test."""
    return "math" if attn == "sdpa" else "sdpa"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/e2e_h100.json")
    ap.add_argument(
        "--quick", action="store_true", help="batch 1 and 8, 128 new tokens, no long run (< 90 s)"
    )
    ap.add_argument("--layers", type=int, help="fewer layers than Qwen3-8B's 36 (smoke tests)")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument(
        "--long-len", type=int, default=8192, help="total length of the batch-1 long run (0: none)"
    )
    ap.add_argument("--hf-tokens", type=int, default=32, help="new tokens per HF generate run (0: skip HF)")
    ap.add_argument("--variants", default="bf16,nvfp4-w4a16,nvfp4-w4a4")
    ap.add_argument("--long-variants", default="nvfp4-w4a16")
    ap.add_argument(
        "--attn",
        choices=("triton", "sdpa", "math"),
        default="triton",
        help="decode attention: the fused Triton kernel (q/k norm, RoPE, cache write, attention) or torch",
    )
    ap.add_argument(
        "--compare-attn",
        action=argparse.BooleanOptionalAction,
        help="also time NVFP4 W4A16 with the other decode attention (sdpa; math if --attn sdpa), batch runs, "
        "long run and kernels per step (default: on, off with --quick)",
    )
    args = ap.parse_args()
    if args.quick:
        args.batches, args.new_tokens, args.long_len, args.hf_tokens = "1,8", 128, 0, 8
        args.variants = "bf16,nvfp4-w4a16"
    if args.compare_attn is None:
        args.compare_attn = not args.quick
    if not torch.cuda.is_available():
        print("e2e_bench needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    from fp4reason.kernels import cuda as kcuda

    res = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        python=platform.python_version(),
        model="Qwen3-8B shapes, random weights" + (f", {args.layers} layers" if args.layers else ""),
        args=vars(args),
        nvfp4_kernel_available=kcuda.available(),
        runs={},
        long={},
        hf={},
        reset={},
        note="ms_per_step = one decode step for the whole batch; x_floor = measured time / byte floor",
    )
    bw = copy_bandwidth(dev)
    res["copy_GBps"] = bw / 1e9
    log(f"{res['device']}: copy bandwidth {bw / 1e9:.0f} GB/s, NVFP4 kernel: {res['nvfp4_kernel_available']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)

    max_len = args.prompt_len + args.new_tokens
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        model = build_model(args.layers, dev)
        if variant == "bf16":
            for b in [1, 8][: 2 if not args.quick else 1] if args.hf_tokens > 0 else []:
                res["hf"][f"bf16_b{b}"] = r = hf_run(model, b, args.prompt_len, args.hf_tokens)
                log(f"HF generate bf16 b={b}: {r['ms_per_step']:.2f} ms/step")
        else:
            from fp4reason.quant import quantize_model

            calib = [torch.randint(0, QWEN3_8B["vocab_size"], (256,)).tolist()]
            quantize_model(model, variant, calib, progress=False)
        engine = Engine(model, None, max_batch_size=max(batches), max_seq_len=max_len, attn=args.attn)
        log(
            f"{variant}: model ready in {time.perf_counter() - t0:.0f} s; weights read per step "
            f"{engine.decoder.weight_bytes() / 1e9:.2f} GB"
        )
        res["runs"][variant] = rows = []
        for b in batches:
            rows.append(engine_run(engine, b, args.prompt_len, args.new_tokens, bw))
            r = rows[-1]
            log(
                f"{variant} b={b}: {r['ms_per_step']:.2f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
                f"{r['achieved_GBps']:.0f} GB/s, {r['x_floor']:.2f}x floor ({r['floor_ms']:.2f} ms)"
            )
            save()
        res.setdefault("gpu_ops_per_step_b1", {})[variant] = n_ops = gpu_ops_per_step(engine, 1)
        log(f"{variant}: {n_ops} GPU kernels/copies per batch-1 step, {len(engine.decoder.layers)} layers")
        for b in [b for b in (1, 8) if b in batches] if variant == "nvfp4-w4a16" else []:
            # the fastest steps: ReSET's and the sampler's largest relative cost
            n = min(args.new_tokens, 256)
            samplers = dict(
                greedy=GREEDY,
                fixed=SamplerConfig(mode="fixed", temperature=0.6, top_p=0.95),
                reset=PRESETS["Qwen3-8B"],
            )
            ms = {
                k: engine_run(engine, b, args.prompt_len, n, bw, sampler=c)["ms_per_step"]
                for k, c in samplers.items()
            }
            res["reset"].setdefault(variant, {})[str(b)] = r = dict(
                ms,
                reset_vs_fixed=ms["reset"] / ms["fixed"] - 1,
                reset_vs_greedy=ms["reset"] / ms["greedy"] - 1,
            )
            log(
                f"{variant} b={b} sampler ms/step {ms}; ReSET vs fixed top-p {r['reset_vs_fixed']:+.1%}, "
                f"vs greedy {r['reset_vs_greedy']:+.1%}"
            )
        del engine
        gc.collect()
        if args.compare_attn and variant == "nvfp4-w4a16":
            other = other_attn(args.attn)
            engine = Engine(model, None, max_batch_size=max(batches), max_seq_len=max_len, attn=other)
            res["attn_" + other] = rows = [
                engine_run(engine, b, args.prompt_len, args.new_tokens, bw) for b in batches
            ]
            ours = {r["batch"]: r["ms_per_step"] for r in res["runs"][variant]}
            log(
                f"{variant} ms/step attn={args.attn} vs attn={other}: "
                + ", ".join(
                    f"b={r['batch']}: {ours[r['batch']]:.2f} vs {r['ms_per_step']:.2f} "
                    f"({r['ms_per_step'] / ours[r['batch']]:.2f}x)"
                    for r in rows
                )
            )
            res["gpu_ops_per_step_b1"][f"{variant}_attn_{other}"] = n_other = gpu_ops_per_step(engine, 1)
            log(f"{variant} GPU kernels/copies per batch-1 step: {args.attn} {n_ops}, {other} {n_other}")
            del engine
            gc.collect()
        if args.long_len and variant in args.long_variants.split(","):
            attns = [args.attn] + ([other_attn(args.attn)] if args.compare_attn else [])
            for attn in attns:
                engine = Engine(model, None, max_batch_size=1, max_seq_len=args.long_len, attn=attn)
                key = variant if attn == args.attn else f"{variant}_attn_{attn}"
                res["long"][key] = r = long_run(engine, args.prompt_len, args.long_len, bw)
                log(
                    f"{key} long run: "
                    + ", ".join(f"{w['context']}: {w['ms_per_step']:.2f} ms" for w in r["windows"])
                )
                del engine
                gc.collect()
                save()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        save()

    def ratio(a: str, b: str, batch: int) -> float | None:
        ra = {r["batch"]: r for r in res["runs"].get(a, [])}
        rb = {r["batch"]: r for r in res["runs"].get(b, [])}
        return rb[batch]["ms_per_step"] / ra[batch]["ms_per_step"] if batch in ra and batch in rb else None

    print("\nbatch | " + " | ".join(f"{v:>14s} ms" for v in res["runs"]) + " | speed-up vs bf16")
    for b in batches:
        cells = [
            next(f"{r['ms_per_step']:9.2f} ({r['x_floor']:.2f}x)" for r in rows if r["batch"] == b)
            for rows in res["runs"].values()
        ]
        ups = [f"{v}: {ratio(v, 'bf16', b):.2f}x" for v in res["runs"] if v != "bf16" and ratio(v, "bf16", b)]
        print(f"{b:5d} | " + " | ".join(cells) + " | " + ", ".join(ups))
    res["speedup_vs_bf16"] = {
        v: {b: ratio(v, "bf16", b) for b in batches} for v in res["runs"] if v != "bf16"
    }
    save()
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
