"""``fp4reason train``: TAQ stage 1 (BF16 fine-tuning) or stage 2 (W4A4KV4 QAT, SEM), resumable.

Multi-GPU: ``accelerate launch --config_file configs/fsdp.yaml -m fp4reason train ...`` (FSDP2).
"""

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune (BF16) or quantization-aware train (W4A4KV4 + SEM) on reasoning traces",
        description="ReQAT training. Re-running the same command resumes from <out>/checkpoints.",
    )
    p.add_argument(
        "--model", required=True, help="model name/dir (a dir with k_shift.safetensors keeps Q-FIT)"
    )
    p.add_argument("--traces", required=True, help='JSONL of {"prompt": ..., "completion": ...}')
    p.add_argument(
        "--prompts", help='JSONL of {"prompt": ...}: first write --traces with a teacher (if absent)'
    )
    p.add_argument("--teacher", help="teacher model for --prompts (default: --model, i.e. self-distillation)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="teacher trace length limit")
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="run directory (checkpoints, train_log.jsonl, final/)")
    p.add_argument("--qat", action="store_true", help="NVFP4 W4A4 weights/inputs + KV4 keys/values, STE")
    p.add_argument(
        "--compile-fake-quant",
        action="store_true",
        help="CPU: torch.compile the fake-quant ops (CUDA: Triton)",
    )
    p.add_argument(
        "--step-weights",
        action="store_true",
        help="with --qat: fake-quantize every weight once per forward, batched (same numbers; one GPU)",
    )
    p.add_argument("--no-kv-quant", action="store_true", help="with --qat: leave keys/values unquantized")
    p.add_argument("--sem", type=float, default=0.0, metavar="LAMBDA", help="SEM weight (ReQAT: 0.1)")
    p.add_argument("--sem-percentile", type=float, default=0.75)
    p.add_argument(
        "--num-traces", type=int, help="first N traces of the seeded order (TAQ: stage 2 <= stage 1)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="per process micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--min-lr-rate", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="master weights")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--stop-after", type=int, help="stop after this many steps in this run")
    p.add_argument(
        "--export-fp4", action="store_true", help="also write <out>/fp4 (compressed-tensors NVFP4)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fp4reason.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        traces=args.traces,
        out_dir=args.out,
        qat=args.qat,
        kv_quant=not args.no_kv_quant,
        compile_fake_quant=args.compile_fake_quant,
        step_weights=args.step_weights,
        sem_lambda=args.sem,
        sem_percentile=args.sem_percentile,
        num_traces=args.num_traces,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_len=args.max_len,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        min_lr_rate=args.min_lr_rate,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        dtype=args.dtype,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=not args.no_resume,
        stop_after=args.stop_after,
        export_fp4=args.export_fp4,
    )
    if args.prompts and not Path(args.traces).is_file():
        make_traces(args)
    print(json.dumps(train(cfg)))
    return 0


def make_traces(args: argparse.Namespace) -> None:
    """Greedy teacher traces (fp4reason's engine) for the prompts file, written to ``args.traces``."""
    import torch

    from fp4reason.models import load_model
    from fp4reason.train.data import write_traces
    from fp4reason.train.traces import generate_traces

    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not recs or not all(isinstance(r.get("prompt"), str) for r in recs):
        raise ValueError(f"{path}: every line needs a string field 'prompt'")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tok = load_model(args.teacher or args.model, dtype=torch.bfloat16, device=device)
    traces = generate_traces(
        teacher,
        tok,
        [r["prompt"] for r in recs],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.gen_batch_size,
        extra=recs,
    )
    write_traces(args.traces, traces)
    print(f"wrote {len(traces)} teacher traces to {args.traces}")
