"""``fp4reason info CKPT``: scheme, layers, bytes and compression ratio of a quantized checkpoint."""

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a quantized checkpoint",
        description="Describe an FP4 checkpoint (fp4reason, compressed-tensors or ModelOpt NVFP4).",
    )
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from fp4reason.quant import checkpoint_info

    info = checkpoint_info(args.ckpt)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("path", info["path"]),
        ("producer", info["producer"]),
        ("architecture", info["architecture"]),
        ("scheme", info["scheme"]),
        ("FP4 layers", info["quantized_layers"]),
        ("FP4 params", f"{info['quantized_params']:,}"),
        ("other params", f"{info['other_params']:,}"),
        ("FP4 tensor bytes", f"{info['quantized_bytes']:,}"),
        ("file bytes", f"{info['file_bytes']:,}"),
        ("bf16 bytes", f"{info['bf16_bytes']:,}"),
        ("compression", f"{info['compression_ratio']:.2f}x vs bf16"),
        ("Q-FIT key shifts", f"{info['k_shift_layers']} layers" if info["k_shift_layers"] else "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
