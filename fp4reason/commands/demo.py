"""``fp4reason demo``: the main job on the default model, end to end on a CPU in a few minutes.

Loads the default model, answers a math question in BF16 (temperature 0.6, top-p 0.95), quantizes the model
to NVFP4 W4A4, answers again with ReSET decoding, and prints both answers with a per-token entropy summary.
"""

import argparse
import copy
import statistics
import sys
import time

QUESTION = (
    "Tom has 3 boxes with 12 pencils in each box. He gives 9 pencils to his sister. "
    "How many pencils does Tom have left?"
)
SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
ANSWER = "27"  # 3 * 12 - 9


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="quantize the default model and compare BF16 vs NVFP4+ReSET answers"
    )
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="default model name or model directory")
    p.add_argument("--scheme", default="nvfp4-w4a4", help="FP4 scheme for the quantized model")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _summary(name: str, gen, t_low: float | None = None) -> str:
    """Per-token raw-logit entropy summary; for ReSET also the share of tokens sampled at T_low."""
    ents = gen.entropies or []
    if not ents:
        return f"{name}: no tokens"
    hi = sorted(ents)[int(0.9 * (len(ents) - 1))]
    line = (
        f"{name:16s} tokens={len(ents):4d}  mean H={statistics.fmean(ents):.3f} nats  "
        f"median H={statistics.median(ents):.3f}  p90 H={hi:.3f}"
    )
    if t_low is not None and gen.temperatures:
        cool = sum(abs(t - t_low) < 1e-6 for t in gen.temperatures) / len(gen.temperatures)
        line += f"  tokens at T_low: {cool:.0%}"
    return line


def run(args: argparse.Namespace) -> int:
    import torch

    from fp4reason.engine import Engine
    from fp4reason.eval.grading import extract_answer
    from fp4reason.models import load_model
    from fp4reason.quant import quantize_model
    from fp4reason.sampling import SamplerConfig, preset_for

    torch.manual_seed(args.seed)
    t0 = time.time()
    print(f"[1/4] loading {args.model} (first run converts it once into the cache)", flush=True)
    model, tokenizer = load_model(args.model)

    def answer(m, sampler):
        return Engine(m, tokenizer, max_batch_size=1, max_seq_len=1024).generate(
            [args.question + SUFFIX],
            sampler=sampler,
            max_new_tokens=args.max_new_tokens,
            chat_template=True,
            return_entropies=True,
            stream=lambda s: print(s, end="", flush=True),
            seed=args.seed,
        )[0]

    print("\n[2/4] BF16 answer (temperature 0.6, top-p 0.95):\n", flush=True)
    bf16 = answer(model, SamplerConfig(mode="fixed", temperature=0.6, top_p=0.95))

    print(f"\n\n[3/4] quantizing to {args.scheme} (max calibration on built-in text)", flush=True)
    qmodel = quantize_model(copy.deepcopy(model), args.scheme, tokenizer=tokenizer)
    reset = preset_for(args.model) or SamplerConfig(mode="reset")
    print(
        f"\n[4/4] {args.scheme} answer with ReSET (t_low={reset.t_low}, t_high={reset.t_high}, "
        f"tau0={reset.tau0}, window={reset.window}, top-p {reset.top_p}):\n",
        flush=True,
    )
    fp4 = answer(qmodel, reset)

    print("\n\n=== summary ===")
    if args.question == QUESTION:
        print(f"expected answer: {ANSWER}")
    for name, gen in (("BF16", bf16), (f"{args.scheme}+ReSET", fp4)):
        print(f"{name:16s} answer: {extract_answer(gen.text)!s:10s} finish={gen.finish_reason}")
    print(_summary("BF16", bf16))
    print(_summary(f"{args.scheme}+ReSET", fp4, t_low=reset.t_low))
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0
