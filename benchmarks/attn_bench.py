"""The fused decode attention alone: µs per layer against its KV byte floor, per partition setting.

Qwen3-8B attention shapes (32 q heads, 8 KV heads, head_dim 128, q/k norm), one decode token per row at
``--kv-lens`` context; one CUDA graph replays the call over ``--layers`` distinct caches (more bytes than
L2 holds), so every call reads its KV from DRAM as in a decode step. The default partition is timed next to
each ``--sweep`` setting ``block_n:iters:warps:stages``; the floor is the K and V bytes at the copy rate.

    python benchmarks/attn_bench.py --batches 1,4,8,16 --kv-lens 1024,1536 --sweep 64:1:4:3,64:2:4:3,...
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e_bench import copy_bandwidth  # noqa: E402
from fp4reason.engine.attention import decode_attention, partition  # noqa: E402

H, HKV, D = 32, 8, 128


def time_graph(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a graph that captured ``fn`` once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def bench_case(caches, b: int, kv_len: int, settings, tables, bw: float) -> list[dict]:
    """µs per call of the default partition and of each (block_n, iters, warps, stages) setting."""
    dev = caches[0][0].device
    cos, sin, qn, kn = tables
    qkv = torch.randn(b, (H + 2 * HKV) * D, device=dev, dtype=torch.bfloat16)
    start = torch.zeros(b, dtype=torch.long, device=dev)
    slot = torch.tensor([kv_len - 8], device=dev)
    floor_us = b * HKV * (kv_len - 8) * D * 2 * 2 / bw * 1e6
    counters = torch.zeros(b * HKV, dtype=torch.int32, device=dev)

    def call(block_n=None, splits=None, warps=None, stages=None):
        for kc, vc in caches:
            decode_attention(
                qkv, kc, vc, slot, start, n_heads=H, n_kv=HKV, scale=D**-0.5, kv_len=kv_len, cos=cos,
                sin=sin, q_norm=qn, k_norm=kn, eps=1e-6, splits=splits, block_n=block_n, num_warps=warps,
                num_stages=stages, counters=counters,
            )  # fmt: skip

    splits, iters, bn = partition(b, HKV, kv_len, dev)
    us = time_graph(call) / len(caches) * 1e6
    rows = [dict(setting=f"default ({bn})", splits=splits, iters=iters, us=us)]
    for bn, iters, warps, stages in settings:
        blocks = -(-kv_len // bn)
        splits = -(-blocks // iters)
        us = time_graph(lambda: call(bn, splits, warps or None, stages or None)) / len(caches) * 1e6  # noqa: B023
        rows.append(dict(setting=f"{bn}:{iters}:{warps}:{stages}", splits=splits, iters=iters, us=us))
    for r in rows:
        r.update(batch=b, kv_len=kv_len, x_floor=r["us"] / floor_us)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--kv-lens", default="1024,1536")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--sweep", default="", help="comma list of block_n:iters:warps:stages (0 = default)")
    ap.add_argument("--out", default="benchmarks/results/attn_bench.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    settings = [tuple(int(v) for v in s.split(":")) for s in args.sweep.split(",") if s]
    res = {"device": torch.cuda.get_device_name(), "copy_Bps": bw, "rows": []}
    max_len = max(int(v) for v in args.kv_lens.split(","))
    cos = torch.randn(max_len, D, device=dev, dtype=torch.bfloat16)
    sin = torch.randn(max_len, D, device=dev, dtype=torch.bfloat16)
    qn = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
    kn = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
    for b in (int(v) for v in args.batches.split(",")):
        caches = [
            (
                torch.randn(b, HKV, max_len, D, device=dev, dtype=torch.bfloat16),
                torch.randn(b, HKV, max_len, D, device=dev, dtype=torch.bfloat16),
            )
            for _ in range(args.layers)
        ]
        for kv_len in (int(v) for v in args.kv_lens.split(",")):
            rows = bench_case(caches, b, kv_len, settings, (cos, sin, qn, kn), bw)
            best = min(rows, key=lambda r: r["us"])
            for r in rows:
                print(
                    f"b={b:2d} kv={kv_len:5d} {r['setting']:>12} splits={r['splits']:3d} "
                    f"iters={r['iters']:2d} {r['us']:7.2f} µs  {r['x_floor']:5.2f}x floor"
                    + ("  <- best" if r is best else "")
                )
            res["rows"] += rows
        del caches
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
