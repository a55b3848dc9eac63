"""``fp4reason analyze``: teacher-force BF16 traces through BF16 and FP4 models and report, per BF16-entropy
bin and token class, top-1 flips, the tail-mass ratio, KL and entropy shifts (plots + summary)."""

import argparse


def register(subparsers) -> None:
    from fp4reason.quant.scheme import SCHEMES

    p = subparsers.add_parser(
        "analyze",
        help="where FP4 perturbs the next-token distribution (entropy-binned diagnostics, plots)",
        description="Generates BF16 traces (T=0.6, top-p 0.95) or reuses the responses of an eval JSONL, "
        "teacher-forces them through the BF16 and the FP4 model and writes summary.txt, stats.json and PNGs.",
    )
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="model name or path (default: %(default)s)")
    p.add_argument("--scheme", default="nvfp4-w4a4", choices=sorted(SCHEMES), help="default: %(default)s")
    p.add_argument("--benchmark", default="gsm8k")
    p.add_argument("--split", default="test", choices=["test", "calib", "all"])
    p.add_argument("--limit", type=int, default=16, help="number of problems/traces (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="engine", choices=["engine", "hf"], help="for generating the traces")
    p.add_argument("--checkpoint", help="saved FP4 checkpoint of --scheme to use instead of quantizing")
    p.add_argument("--traces", help="reuse the responses of this eval JSONL instead of generating")
    p.add_argument(
        "--traces-config", default="bf16", help="which config's responses to reuse (default: bf16)"
    )
    p.add_argument("--out", help="output directory (default: runs/analyze-<model>-<scheme>)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fp4reason.eval.backends import EngineBackend, HFBackend
    from fp4reason.eval.data import load_benchmark
    from fp4reason.eval.diagnostics import analyze_models, summary_text
    from fp4reason.eval.runner import ModelPool, read_records

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    problems = load_benchmark(args.benchmark, split=args.split, limit=args.limit)
    responses = None
    if args.traces:
        recs = {
            r["problem_id"]: r["response"]
            for r in read_records(args.traces)
            if r["config"] == args.traces_config and r["sample"] == 0
        }
        problems = [p for p in problems if p.id in recs]
        if not problems:
            raise ValueError(f"{args.traces} has no '{args.traces_config}' responses for these problems")
        responses = [recs[p.id] for p in problems]
    pool = ModelPool(args.model, checkpoints={args.scheme: args.checkpoint} if args.checkpoint else None)
    bf16, tok = pool.model_for("bf16")
    fp4, _ = pool.model_for(args.scheme)
    backend = None
    if responses is None:
        backend = (
            HFBackend(bf16, tok, args.batch_size)
            if args.backend == "hf"
            else EngineBackend(bf16, tok, args.batch_size, args.max_new_tokens + 1024)
        )
    out = Path(args.out or f"runs/analyze-{Path(str(args.model)).name}-{args.scheme}")
    title = f"{args.model}: {args.scheme} vs BF16 on {len(problems)} {args.benchmark} traces"
    res = analyze_models(
        bf16,
        fp4,
        tok,
        problems,
        backend,
        out,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        responses=responses,
        title=title,
    )
    print(summary_text(res, title))
    print(f"wrote {out}/summary.txt, stats.json, flip_rate.png, rho.png, kl.png, entropy_shift.png")
    return 0
