"""Quantize-dequantize speed for QAT: eager torch vs ``torch.compile`` vs the Triton kernels, with the floor.

Cases: activations [2048, 1024] and [2048, 3072] (float32 and bfloat16, NVFP4 with a dynamic tensor scale),
K/V [1, 8, 2048, 128] bfloat16 (KV4), and the stacked float32 master weights of Qwen3-0.6B as
``step_weights`` quantizes them (one call per weight shape: q [28, 2048, 1024], k+v [56, 1024, 1024], o,
gate+up, down). Time per call is the median over repeats of a loop of back-to-back calls between CUDA
events (launch overhead included, as in training). Floor = (bytes read once + bytes written once) / the
device-copy bandwidth measured in the same run; the Triton path reads its input twice (amax, then qdq).
Every backend's output is first checked bit for bit against eager torch; a mismatch exits 1.

    python benchmarks/fakequant_bench.py [--out benchmarks/results/fakequant_bench_h100.json]
    TRITON_INTERPRET=1 python benchmarks/fakequant_bench.py --tiny   # CPU smoke run (interpreter timings)
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from fp4reason.formats import qdq_kv4, qdq_nvfp4
from fp4reason.kernels import fakequant as tri
from fp4reason.train.fakequant import qdq_nvfp4_stacked

QWEN3_0_6B_STACKS = {  # step_weights groups: (count, N, K)
    "q": (28, 2048, 1024),
    "k+v": (56, 1024, 1024),
    "o": (28, 1024, 2048),
    "gate+up": (56, 3072, 1024),
    "down": (28, 1024, 3072),
}
TORCH = {"nvfp4": qdq_nvfp4, "kv4": qdq_kv4, "stacked": qdq_nvfp4_stacked}
TRITON = {"nvfp4": tri.qdq_nvfp4, "kv4": tri.qdq_kv4, "stacked": tri.qdq_nvfp4_stacked}


def cases(tiny: bool) -> list[tuple[str, str, tuple, torch.dtype]]:
    """(name, kind, shape, dtype); ``tiny`` divides every dimension by 16 and the last one by 4."""

    def shape(*dims: int) -> tuple:
        return tuple(max(1, d // 16) for d in dims[:-1]) + (dims[-1] // 4,) if tiny else dims

    out = [
        (f"act {list(shape(2048, k))}", "nvfp4", shape(2048, k), dtype)
        for k in (1024, 3072)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    out.append((f"kv {list(shape(1, 8, 2048, 128))}", "kv4", shape(1, 8, 2048, 128), torch.bfloat16))
    for name, dims in QWEN3_0_6B_STACKS.items():
        out.append((f"w {name} {list(shape(*dims))}", "stacked", shape(*dims), torch.float32))
    return out


def time_us(fn, reps: int, calls: int, device) -> float:
    """Median µs per call over ``reps`` loops of ``calls`` back-to-back calls."""
    fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(samples)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), reps=7, calls=5, device=device)
    return 2 * nbytes / (us * 1e-6)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    return bool(((a.view(bits) == b.view(bits)) | nan).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--tiny", action="store_true", help="1/16 of every dimension (CPU interpreter smoke run)")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.tiny and tri.interpreted()):
        raise SystemExit("needs a CUDA GPU (or, for a smoke run, --tiny with TRITON_INTERPRET=1)")
    if device.type == "cpu":
        args.reps, args.calls, args.no_compile = 1, 1, True
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # a silent eager fallback would mislead
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    compiled = {k: torch.compile(f, dynamic=True) for k, f in TORCH.items()}
    bw = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**24)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"device {name}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    head = f"{'case':<28}{'dtype':>9}{'MB r+w':>8}{'floor us':>10}{'eager':>10}{'compiled':>10}{'triton':>10}"
    print(head + f"{'tri/floor':>10}{'cmp/tri':>9}{'eag/tri':>9}", flush=True)
    rows, bad = [], []
    gen = torch.Generator(device=device).manual_seed(0)
    for label, kind, shape, dtype in cases(args.tiny):
        spread = torch.randn(shape, generator=gen, device=device).mul_(3).exp_()  # magnitudes e^(+-10)
        x = torch.randn(shape, generator=gen, device=device).mul_(spread).to(dtype)
        del spread
        ref = TORCH[kind](x)
        fns = {"eager": TORCH[kind], "triton": TRITON[kind]}
        if not args.no_compile:
            fns["compiled"] = compiled[kind]
        for b, f in fns.items():
            if b != "eager" and not same_bits(f(x), ref):
                bad.append(f"{label} {dtype}: {b} differs from eager")
        del ref
        us = {b: time_us(lambda f=f, x=x: f(x), args.reps, args.calls, device) for b, f in fns.items()}
        nbytes = 2 * x.numel() * x.element_size()
        floor = nbytes / bw * 1e6
        rows.append(dict(case=label, kind=kind, shape=list(shape), dtype=str(dtype), bytes=nbytes))
        rows[-1].update(floor_us=floor, **us)
        c = us.get("compiled", float("nan"))
        print(
            f"{label:<28}{str(dtype)[6:]:>9}{nbytes / 1e6:>8.1f}{floor:>10.1f}{us['eager']:>10.1f}{c:>10.1f}"
            f"{us['triton']:>10.1f}{us['triton'] / floor:>10.2f}{c / us['triton']:>9.2f}"
            f"{us['eager'] / us['triton']:>9.2f}",
            flush=True,
        )
        del x
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        doc = {"device": name, "torch": torch.__version__, "copy_bw_bytes_per_s": bw, "rows": rows}
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, out)
        print(f"wrote {out}")
    if bad:
        print("NUMERICS MISMATCH:\n  " + "\n  ".join(bad))
        raise SystemExit(1)
    print("all backends bit-identical to eager on every case")


if __name__ == "__main__":
    main()
