"""``fp4reason calibrate-tau MODEL``: ReSET's tau0 for a (quantized) model, the 80th percentile of the
raw-logit entropy of its own generations (T 0.6, top-p 0.95) on a few calibration problems."""

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-tau",
        help="calibrate ReSET's tau0 on the quantized model's own generations",
        description="tau0 = a percentile of raw-logit token entropy over generations for a few problems of "
        "a benchmark's calibration split (never its test split).",
    )
    p.add_argument("model", help="a model name or path understood by fp4reason.models.load_model")
    p.add_argument(
        "--scheme", default="nvfp4-w4a4", help="FP4 scheme to quantize to first, or 'bf16' for none"
    )
    p.add_argument("--problems", type=int, default=5, help="number of calibration problems (default: 5)")
    p.add_argument("--benchmark", default="champ", help="benchmark name or .jsonl (default: champ)")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--percentile", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import random

    import torch

    from fp4reason.eval.data import load_benchmark
    from fp4reason.eval.prompts import user_prompt
    from fp4reason.models import load_model
    from fp4reason.sampling import calibrate_tau

    if args.problems < 1:
        raise ValueError(f"--problems must be >= 1, got {args.problems}")
    pool = load_benchmark(args.benchmark, split="calib")
    problems = random.Random(args.seed).sample(pool, min(args.problems, len(pool)))
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if args.scheme.lower() not in ("bf16", "none"):
        if getattr(model.config, "quantization_config", None):
            print(f"{args.model} is already quantized: calibrating it as loaded")
        else:
            from fp4reason.quant import quantize_model

            quantize_model(model, args.scheme, tokenizer=tokenizer)
    tau = calibrate_tau(
        model,
        tokenizer,
        [user_prompt(p) for p in problems],
        max_new_tokens=args.max_new_tokens,
        percentile=args.percentile,
        seed=args.seed,
        progress=True,
    )
    print(
        f"tau0 = {tau:.4f}  ({args.model}, {args.scheme}, {len(problems)} {args.benchmark} calibration "
        f"problems, "
        f"p{round(100 * args.percentile)} of raw-logit entropy)"
    )
    return 0
