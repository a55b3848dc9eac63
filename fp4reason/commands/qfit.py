"""``fp4reason qfit MODEL --out DIR``: Q-FIT calibration (paired pre-RoPE q/k scales folded into the
weights, post-RoPE key shifts in DIR/k_shift.safetensors). Then ``fp4reason quantize DIR --scheme
nvfp4-w4a4kv4 --out CKPT`` keeps the shifts, and every KV4 path that loads CKPT subtracts them."""

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "qfit",
        help="Q-FIT: make keys KV4-friendly without changing attention (writes a model dir + k_shift)",
        description="Grid-search per-layer (alpha_s, alpha_m) on calibration text; write the "
        "transformed model "
        "(scales folded into q/k weights or Qwen3 q/k norms) and k_shift.safetensors next to it.",
    )
    p.add_argument("model", nargs="?", help="model name or directory")
    p.add_argument("--model", dest="model_opt", metavar="MODEL", help="same as the positional MODEL")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--calib-file", help="calibration text (default: fp4reason's built-in calibration text)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grid", type=int, default=20, help="alphas in {0, 1/grid, ..., (grid-1)/grid}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def calibration_ids(tokenizer, text: str, samples: int, seq_len: int):
    import torch

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = min(samples, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def run(args: argparse.Namespace) -> int:
    import os
    import shutil
    from pathlib import Path

    import torch

    from fp4reason.quant import calibration_text
    from fp4reason.train.qfit import K_SHIFT_FILE, qfit, save_k_shift
    from fp4reason.train.trainer import load_for_training

    if (args.model is None) == (args.model_opt is None):
        raise ValueError("give the model once: `fp4reason qfit MODEL --out DIR` (or --model MODEL)")
    model_name = args.model or args.model_opt
    if args.calib_file and not Path(args.calib_file).is_file():
        raise FileNotFoundError(f"calibration file not found: {args.calib_file}")
    text = Path(args.calib_file).read_text(encoding="utf-8") if args.calib_file else calibration_text()
    model, tok = load_for_training(model_name, getattr(torch, args.dtype))
    model.to(args.device)
    fits = qfit(model, calibration_ids(tok, text, args.samples, args.seq_len).to(args.device), grid=args.grid)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_k_shift(model, tmp / K_SHIFT_FILE)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    for i, f in enumerate(fits):
        print(
            f"layer {i:3d}: alpha_s={f.alpha_s:.2f} alpha_m={f.alpha_m:.2f} "
            f"KV4 attention MSE {f.err_before:.3e} -> {f.err_after:.3e}"
        )
    print(f"wrote {out} (weights with folded Q-FIT scales, {K_SHIFT_FILE} with {len(fits)} key shifts)")
    return 0
