"""``fp4reason quantize MODEL --scheme nvfp4-w4a4 --out DIR``: PTQ and a compressed-tensors checkpoint.

A MODEL directory written by ``fp4reason qfit`` (or ``fp4reason train``) has ``k_shift.safetensors``: its
Q-FIT key shifts are loaded, checked and written into the checkpoint, where the KV4 cache applies them."""

import argparse


def register(subparsers) -> None:
    from fp4reason.quant.scheme import SCHEMES

    p = subparsers.add_parser(
        "quantize",
        help="quantize a model to FP4 and save a compressed-tensors checkpoint",
        description="Post-training FP4 quantization (RTN; activation scales calibrated on a built-in text).",
    )
    p.add_argument("model", help="a model name or path understood by fp4reason.models.load_model")
    p.add_argument("--scheme", default="nvfp4-w4a4", choices=sorted(SCHEMES), help="default: %(default)s")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--calib-file", help="calibration text file (default: the built-in calibration text)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from fp4reason.models import load_model
    from fp4reason.quant import checkpoint_info, quantize_model, save_quantized
    from fp4reason.quant.kshift import K_SHIFT_FILE, load_k_shift

    calib = None
    if args.calib_file:
        path = Path(args.calib_file)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        calib = [path.read_text(encoding="utf-8")]
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    shift_file = Path(args.model) / K_SHIFT_FILE
    if shift_file.is_file() and not getattr(model.config, "quantization_config", None):
        load_k_shift(model, shift_file)
    quantize_model(model, args.scheme, calib, tokenizer=tokenizer)
    out = save_quantized(model, args.out, tokenizer)
    info = checkpoint_info(out)
    print(
        f"wrote {out}: {info['scheme']}, {info['quantized_layers']} FP4 layers, "
        f"{info['file_bytes'] / 2**20:.1f} MiB ({info['compression_ratio']:.2f}x smaller than bf16)"
    )
    if info["k_shift_layers"]:
        used = "applied to the KV4 cache" if info["kv_quant"] else f"unused: {args.scheme} has no KV4 cache"
        print(f"kept Q-FIT key shifts for {info['k_shift_layers']} layers ({used})")
    return 0
