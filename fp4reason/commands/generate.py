"""``fp4reason generate``: decode one or more prompts with the fast engine (streams text for one prompt)."""

import argparse
import sys

SAMPLERS = ("reset", "fixed", "greedy")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="default model name, model directory or FP4 checkpoint")
    p.add_argument("--scheme", help="quantize on load to this FP4 scheme (e.g. nvfp4-w4a4)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--sampler", choices=SAMPLERS, default="reset", help="ReSET, fixed temperature, greedy")
    p.add_argument("--temperature", type=float, default=0.6, help="temperature of --sampler fixed")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--t-low", type=float, help="ReSET low temperature (default: the model's preset or 0.1)")
    p.add_argument("--tau0", type=float, help="ReSET entropy threshold in nats (default: preset or 0.55)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int)


def sampler_from_args(args: argparse.Namespace):
    from dataclasses import replace

    from fp4reason.sampling import SamplerConfig, preset_for

    if args.sampler == "greedy":
        return SamplerConfig(mode="greedy")
    if args.sampler == "fixed":
        return SamplerConfig(mode="fixed", temperature=args.temperature, top_p=args.top_p)
    cfg = replace(preset_for(args.model) or SamplerConfig(mode="reset"), top_p=args.top_p)
    if args.t_low is not None:
        cfg = replace(cfg, t_low=args.t_low)
    if args.tau0 is not None:
        cfg = replace(cfg, tau0=args.tau0)
    return cfg


def load_engine(args: argparse.Namespace, max_batch_size: int):
    import torch

    from fp4reason.engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device != "cpu" else "float32")  # bf16 matmuls are slow on CPUs
    return Engine.from_pretrained(
        args.model,
        scheme=args.scheme,
        device=device,
        dtype=getattr(torch, dtype),
        max_batch_size=max_batch_size,
        max_seq_len=args.max_seq_len,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with the fast decode engine")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    p.add_argument("--entropies", action="store_true", help="print per-token entropy / temperature summaries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import statistics

    engine = load_engine(args, max_batch_size=min(16, len(args.prompt)))
    single = len(args.prompt) == 1
    stream = (lambda s: print(s, end="", flush=True)) if single else None
    gens = engine.generate(
        args.prompt,
        sampler=sampler_from_args(args),
        max_new_tokens=args.max_new_tokens,
        chat_template=args.chat,
        return_entropies=args.entropies,
        stream=stream,
        seed=args.seed,
    )
    for i, g in enumerate(gens):
        if single:
            print()
        else:
            print(f"=== [{i}] {args.prompt[i]!r}\n{g.text}")
        note = f"[{len(g.token_ids)} tokens, stopped on {g.finish_reason}"
        if args.entropies and g.entropies:
            low = sum(t < 0.99 for t in g.temperatures) / len(g.temperatures)
            note += f", mean entropy {statistics.fmean(g.entropies):.3f} nats, {low:.0%} of tokens below T=1"
        print(note + "]", file=sys.stderr)
    return 0
