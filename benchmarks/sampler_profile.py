"""Per-kernel GPU time of one BatchedSampler step (152k vocabulary, bf16 logits like the engine's lm_head).

For each batch size and mode: the step captured in a CUDA graph and replayed (µs per step), then the torch
profiler's kernel table over eager calls (which kernels the time goes to). CUDA only.

    python benchmarks/sampler_profile.py --batches 1 8 --modes fixed reset
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4reason.sampling import BatchedSampler, SamplerConfig  # noqa: E402

NL, DNL = torch.tensor([198]), torch.tensor([271, 382])  # Qwen2 vocabulary: "\n", "\n\n", ".\n\n"


def graph_us(sampler: BatchedSampler, x: torch.Tensor, iters: int = 200) -> float:
    for _ in range(3):
        sampler(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sampler(x)
    for _ in range(10):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=["fixed", "reset"])
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sampler_profile.py needs a CUDA GPU")
    for b in args.batches:
        for mode in args.modes:
            s = BatchedSampler(SamplerConfig(mode=mode), b, "cuda", NL, DNL, validate=False)
            x = (torch.randn(b, args.vocab, device="cuda") * 3).bfloat16()
            print(f"b={b} {mode}: graph replay {graph_us(s, x):.1f} us")
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(20):
                    s(x)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
