"""Where a decode step's GPU time goes: one eager engine step under the PyTorch profiler, per kernel.

Qwen3-8B shapes with fewer layers (per-layer work is the same), random weights; prints, per variant and
batch, the kernels of one step grouped by name (count, total µs) next to the CUDA-graph step time, so
the gap between summed kernel time and the replayed step (launch gaps) is visible.

    python benchmarks/step_profile.py --layers 4 --batches 1,16 [--graph]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e_bench import GREEDY, QWEN3_8B, build_model  # noqa: E402
from fp4reason.engine import Engine  # noqa: E402


@torch.no_grad()
def profile_step(engine: Engine, batch: int, kv_len: int, graph: bool = False, reps: int = 5):
    """Per kernel name: (name, count per step, µs per step). ``graph``: replays of the captured step (the
    compiled kernels the benchmarks time), else eager steps."""
    st = engine._batch(GREEDY, batch)
    st.slot.fill_(kv_len - 2)
    run = (lambda: engine._replay(st, kv_len)) if graph else (lambda: engine._step(st, kv_len))
    for _ in range(3):
        st.slot.fill_(kv_len - 2)
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            st.slot.fill_(kv_len - 2)
            run()
        torch.cuda.synchronize()
    rows: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memset"):
            r = rows.setdefault(e.name[:90], [0, 0.0])
            r[0] += 1
            r[1] += e.device_time
    return sorted(((k, n / reps, t / reps) for k, (n, t) in rows.items()), key=lambda r: -r[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--variants", default="bf16,nvfp4-w4a16")
    ap.add_argument("--attn", default=None, help="decode attention (default: the engine's)")
    ap.add_argument("--kv-len", type=int, default=1024)
    ap.add_argument("--graph", action="store_true", help="profile CUDA-graph replays of the compiled step")
    args = ap.parse_args()
    dev = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    for variant in args.variants.split(","):
        model = build_model(args.layers, dev)
        if variant != "bf16":
            from fp4reason.quant import quantize_model

            quantize_model(
                model, variant, [torch.randint(0, QWEN3_8B["vocab_size"], (256,)).tolist()], progress=False
            )
        engine = Engine(
            model,
            None,
            max_batch_size=max(batches),
            max_seq_len=args.kv_len + 256,
            attn=args.attn,
            use_cuda_graphs=args.graph or None,
            compile=args.graph or None,
        )
        for b in batches:
            rows = profile_step(engine, b, args.kv_len, args.graph)
            total = sum(t for _, _, t in rows)
            n = sum(c for _, c, _ in rows)
            ps = [[1] * 64 for _ in range(b)]
            engine.warmup(b, 64 + 129, GREEDY)
            engine.generate(ps, sampler=GREEDY, max_new_tokens=128, seed=0)
            step = engine.stats["decode_s"] / engine.stats["steps"] * 1e6
            print(
                f"\n== {variant} b={b} layers={args.layers}: {n} kernels, summed kernel time {total:.0f} µs, "
                f"graph step {step:.0f} µs (gap {step - total:.0f} µs = {(step - total) / n:.2f} µs/kernel)"
            )
            for name, c, t in rows:
                print(f"{c:7.1f} {t:9.1f} µs  {t / c:7.2f}  {name}")
        del engine, model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
