"""Per-token cost of ReSET vs plain temperature sampling, 152k vocabulary, batch 1 / 8 / 16.

Rows per batch size: "plain" (temperature 0.6 + top-p 0.95 + exponential-race sample, no entropy, no state),
"fixed" (BatchedSampler in fixed mode: plain + the raw-logit entropy the engine records), "reset"
(BatchedSampler in ReSET mode), "reset_only" (just what ReSET adds: entropy, state update, temperature
choice, token record) and "reference" (the aiha-lab style: ReSET per row in Python with one ``.item()`` host
sync per row). "plain", "fixed", "reset" and "reset_only" come twice on CUDA: the torch path (~50 kernels,
top-p by a sort) and the fused Triton path (fp4reason/sampling/fused.py for entropy and ReSET,
fp4reason/sampling/nucleus.py for top-p without a sort), which is the default on CUDA. On CUDA all but
"reference" are timed eagerly and replayed from a captured CUDA graph (the way the decode engine runs them).
ReSET's overhead per step (= per token of each row) is reset - plain (fused: reset fused - plain fused), and
directly reset_only. Before timing,
the fused sampler must reproduce the torch path's tokens and temperatures step for step (else it exits 1).

    python benchmarks/sampler_overhead.py --device cuda --out benchmarks/results/sampler_overhead_gpu.json
    python benchmarks/sampler_overhead.py --device cpu --out benchmarks/results/sampler_overhead_cpu.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4reason.sampling import (  # noqa: E402
    BatchedSampler,
    SamplerConfig,
    StepEntropyState,
    select_temperature,
    token_entropy,
    top_p_mask,
)

NL, DNL = torch.tensor([198]), torch.tensor([271, 382])  # Qwen2 vocabulary: "\n", "\n\n", ".\n\n"


def plain(logits: torch.Tensor, generator=None) -> torch.Tensor:
    probs = top_p_mask(logits.float() / 0.6, 0.95).softmax(-1)
    return probs.div_(torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


class ReferenceStyle:
    """ReSET as the reference runs it: one Python state per row, ``.item()`` on each row's entropy."""

    def __init__(self, b: int, w: int = 32, t_low: float = 0.1, t_high: float = 1.0, tau0: float = 0.55):
        self.rows = [dict(sw=deque(maxlen=w), step=[], s=0.0, n=0, out=[]) for _ in range(b)]
        self.w, self.t_low, self.t_high, self.tau0 = w, t_low, t_high, tau0
        self.nl, self.dnl = set(NL.tolist()), set(DNL.tolist())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = []
        for row, x in zip(self.rows, logits, strict=True):
            H = token_entropy(x[None]).item()  # the per-row host sync
            o = row["out"]
            if o and (o[-1] in self.dnl or (len(o) > 1 and o[-1] in self.nl and o[-2] in self.nl)):
                row["step"] = []
            if len(row["step"]) < self.w:
                est = sum(row["sw"]) / len(row["sw"]) if row["sw"] else H
            else:
                est = sum(row["step"]) / len(row["step"])
            mean = row["s"] / row["n"] if row["n"] else est
            tau = est if est > mean else self.tau0
            T = self.t_high if H >= tau else self.t_low
            row["sw"].append(H), row["step"].append(H)
            row["s"], row["n"] = row["s"] + H, row["n"] + 1
            tok = plain(x[None] * (0.6 / T))[0]
            o.append(int(tok))  # the reference keeps token ids on the host as well
            out.append(tok)
        return torch.stack(out)


def make_fns(b: int, logits: torch.Tensor, device: torch.device, compile: bool) -> dict:
    fixed = BatchedSampler(SamplerConfig(mode="fixed"), b, device, NL, DNL, validate=False, fused=False)
    reset = BatchedSampler(SamplerConfig(mode="reset"), b, device, NL, DNL, validate=False, fused=False)
    ref = ReferenceStyle(b)
    state, tok = StepEntropyState(b, 32, device, NL, DNL), torch.full((b,), 271, device=device)

    def reset_only():  # the work ReSET adds to plain sampling: entropy, state update, temperature choice
        H = token_entropy(logits)
        T = select_temperature("reset", H, state.step(H), 0.1, 1.0, 0.55)
        state.record(tok)
        return T

    fns = dict(
        plain=lambda: plain(logits),
        fixed=lambda: fixed(logits),
        reset=lambda: reset(logits),
        reset_only=reset_only,
        reference=lambda: ref(logits),
    )
    if device.type == "cuda":
        fns |= make_fused(b, logits, device)
    return fns | (dict(reset_compiled=make_compiled(b, logits, device)) if compile else {})


def make_fused(b: int, logits: torch.Tensor, device: torch.device) -> dict:
    """The Triton path; fused=True raises if triton is missing, so there is no silent fallback."""
    from fp4reason.sampling import fused as fz
    from fp4reason.sampling import nucleus

    if fz.interpreted():
        raise SystemExit("TRITON_INTERPRET is set: the fused timings would be the interpreter's")
    fixed = BatchedSampler(SamplerConfig(mode="fixed"), b, device, NL, DNL, validate=False, fused=True)
    reset = BatchedSampler(SamplerConfig(mode="reset"), b, device, NL, DNL, validate=False, fused=True)
    cfg = SamplerConfig(mode="reset")
    state, tok = StepEntropyState(b, 32, device, NL, DNL), torch.full((b,), 271, device=device)
    params = fz.sampler_params(cfg, cfg.window, device)

    def reset_only():  # entropy + state + temperature (2 launches), token choice + record (1 launch)
        H, greedy, T, _ = fz.entropy_temperature(logits, state, "reset", params)
        return fz.finish(tok, greedy, T, state)

    T = torch.full((b,), 0.6, device=device)
    return dict(
        plain_fused=lambda: nucleus.sample(logits, T, 0.95),
        fixed_fused=lambda: fixed(logits),
        reset_fused=lambda: reset(logits),
        reset_only_fused=reset_only,
    )


def check_fused(b: int, vocab: int, device: torch.device, steps: int = 40) -> None:
    """Exit 1 unless the fused sampler gives the torch path's tokens and temperatures step for step."""
    torch_path = BatchedSampler(SamplerConfig(mode="reset"), b, device, NL, DNL, fused=False)
    fused = BatchedSampler(SamplerConfig(mode="reset"), b, device, NL, DNL, fused=True)
    gen = torch.Generator(device).manual_seed(b)
    for i in range(steps):
        x = (
            torch.randn(b, vocab, device=device, generator=gen)
            * torch.rand(b, 1, device=device, generator=gen)
            * 8
        )
        x[:, [198, 271]] += 8 * (i % 7 < 2)  # newline tokens win now and then: step boundaries
        seed = 1000 * b + i
        a = torch_path(x, torch.Generator(device).manual_seed(seed))
        f = fused(x, torch.Generator(device).manual_seed(seed))
        same = torch.equal(a.tokens, f.tokens) and torch.equal(a.temperature, f.temperature)
        if not same or not torch.allclose(a.entropy, f.entropy, atol=1e-4, rtol=1e-5):
            raise SystemExit(
                f"fused sampler differs from the torch path at batch {b}, step {i}: tokens "
                f"{a.tokens.tolist()} vs {f.tokens.tolist()}, T {a.temperature.tolist()} vs "
                f"{f.temperature.tolist()}, H {a.entropy.tolist()} vs {f.entropy.tolist()}"
            )


def make_compiled(b: int, logits: torch.Tensor, device: torch.device):
    s = BatchedSampler(SamplerConfig(mode="reset"), b, device, NL, DNL, validate=False, compile=True)
    return lambda: s(logits)


def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call: the mean over ``iters`` on CUDA (events), the median of single calls on the CPU
    (robust to other processes sharing the cores)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(fn, device: torch.device):
    """Capture ``fn`` (no arguments, static inputs) into a CUDA graph and return its replay."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default: 200 cuda, 7 cpu)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--compile-batches",
        type=int,
        nargs="*",
        default=None,
        help="batch sizes that also time BatchedSampler(compile=True) (default: 1 on cuda, none on cpu)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    iters = args.iters or (200 if cuda else 7)
    torch.manual_seed(0)
    results = []
    for b in args.batch:
        logits = (torch.randn(b, args.vocab, device=device) * 3).contiguous()
        compile_batches = args.compile_batches if args.compile_batches is not None else ([1] if cuda else [])
        if cuda:
            check_fused(b, args.vocab, device)
        fns = make_fns(b, logits, device, b in compile_batches)
        for name, fn in fns.items():
            for _ in range(3 if cuda else 1):
                fn()
            n = max(2, iters // (4 if name == "reference" and b > 1 else 1))
            results.append(dict(batch=b, sampler=name, graph=False, us_per_call=1e6 * timed(fn, n, device)))
            if cuda and name != "reference":
                results.append(
                    dict(
                        batch=b,
                        sampler=name,
                        graph=True,
                        us_per_call=1e6 * timed(graphed(fn, device), iters, device),
                    )
                )
    t = {(r["batch"], r["sampler"], r["graph"]): r["us_per_call"] for r in results}
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}) "
        f"vocab={args.vocab} torch={torch.__version__}  (us per call; torch = ~50 small kernels, "
        f"fused = Triton fp4reason/sampling/fused.py + nucleus.py)"
    )
    cols = [
        ("plain", "plain"),
        ("plain_fused", "plain fused"),
        ("fixed", "fixed torch"),
        ("fixed_fused", "fixed fused"),
        ("reset", "reset torch"),
        ("reset_fused", "reset fused"),
        ("reset_only", "reset-only torch"),
        ("reset_only_fused", "reset-only fused"),
        ("reset_compiled", "reset compiled"),
    ]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(
        f"{'batch':>5} {'mode':>6} "
        + " ".join(f"{h:>{max(9, len(h))}}" for _, h in cols)
        + f" {'reference':>10} {'reset-plain torch':>17} {'reset-plain fused':>17} {'torch/fused added':>17}"
    )
    summary = []
    for b in args.batch:
        for graph in [False, True] if cuda else [False]:
            v = {k: t.get((b, k, graph)) for k, _ in cols}
            p, r, rf, c = v["plain"], v["reset"], v["reset_fused"], v["reset_compiled"]
            pf = v["plain_fused"]
            ref = t[(b, "reference", False)]
            row = dict(
                batch=b,
                graph=graph,
                plain_us=p,
                plain_fused_us=pf,
                fixed_us=v["fixed"],
                fixed_fused_us=v["fixed_fused"],
                reset_us=r,
                reset_fused_us=rf,
                reset_only_us=v["reset_only"],
                reset_only_fused_us=v["reset_only_fused"],
                reset_compiled_us=c,
                reset_compiled_overhead_us=None if c is None else c - p,
                reference_us=ref,
                reset_overhead_us=r - p,
                reset_fused_overhead_us=None if rf is None else rf - pf,
                reset_over_plain=r / p,
                reset_fused_over_plain=None if rf is None else rf / pf,
                reference_over_reset=ref / r,
                reference_over_reset_fused=None if rf is None else ref / rf,
            )
            summary.append(row)
            ratio = None if rf is None or rf - pf <= 0 else (r - p) / (rf - pf)
            print(
                f"{b:5d} {'graph' if graph else 'eager':>6} "
                + " ".join(f"{fmt(v[k]):>{max(9, len(h))}}" for k, h in cols)
                + f" {ref:10.1f} {r - p:17.1f} {fmt(row['reset_fused_overhead_us']):>17} "
                f"{'-' if ratio is None else format(ratio, '.1f') + 'x':>17}"
            )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            device=str(device),
            device_name=torch.cuda.get_device_name(device) if cuda else platform.processor(),
            torch=torch.__version__,
            vocab=args.vocab,
            iters=iters,
            threads=torch.get_num_threads(),
            cpu_count=os.cpu_count(),
            load_average_1m=os.getloadavg()[0],  # other processes sharing the cores distort CPU timings
            command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        )
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(dict(meta=meta, summary=summary, raw=results), indent=1))
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
