"""Two-GPU FSDP2 check of ReQAT training (``fp4reason train --qat --sem`` under ``accelerate launch``).

``prepare`` (here, on any machine) writes a tiny Qwen3 built from a config (random weights, SmolLM2's
tokenizer, a few MB) and synthetic worked-arithmetic traces into a folder that travels to the GPU host;
``compare`` (there, after benchmarks/run_fsdp_check.sh) checks that the run stopped after 3 steps and resumed
ends with the same losses and bit-identical final weights as the uninterrupted run, and that the exported FP4
checkpoint loads. Exits 1 on any mismatch.

    python benchmarks/fsdp_check.py prepare --out .carry/fsdp
    python benchmarks/fsdp_check.py compare RUN_A RUN_B
"""

import argparse
import json
import sys
from pathlib import Path


def prepare(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from fp4reason.models import load_model
    from fp4reason.train.synthetic import make_problems

    load_model("smollm2-135m")  # materialises the embedded model's folder (its tokenizer is used)
    tok = AutoTokenizer.from_pretrained(Path.home() / ".cache" / "fp4reason" / "models" / "smollm2-135m")
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    rows = [{"prompt": p["prompt"], "completion": p["completion"]} for p in make_problems(64, seed=1)]
    (out / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters, {len(rows)} traces")


def compare(a: Path, b: Path) -> int:
    from safetensors.torch import load_file

    from fp4reason.quant.checkpoint import checkpoint_info

    def log(run: Path) -> list[dict]:
        return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x]

    la, lb = log(a), log(b)
    bad = []
    if [r["step"] for r in la] != [r["step"] for r in lb]:
        bad.append(f"steps differ: {[r['step'] for r in la]} vs {[r['step'] for r in lb]}")
    elif [r["loss"] for r in la] != [r["loss"] for r in lb]:
        pairs = zip(la, lb, strict=True)
        bad.append("losses differ: " + ", ".join(f"{x['loss']:.6f}/{y['loss']:.6f}" for x, y in pairs))
    wa = {k: v for f in sorted((a / "final").glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted((b / "final").glob("*.safetensors")) for k, v in load_file(f).items()}
    diff = [k for k in wa if k not in wb or not wa[k].equal(wb[k])]
    if not wa or diff or wa.keys() != wb.keys():
        bad.append(f"final weights differ ({len(diff)} of {len(wa)} tensors)")
    info = checkpoint_info(b / "fp4")
    print(f"{len(la)} steps; loss {la[0]['loss']:.4f} -> {la[-1]['loss']:.4f}")
    print(f"final weights: {len(wa)} tensors")
    print(f"exported FP4 checkpoint: {json.dumps(info, default=str)[:400]}")
    if bad:
        print("MISMATCH:\n  " + "\n  ".join(bad))
        return 1
    print("resumed FSDP run == uninterrupted FSDP run (losses and final weights bit for bit)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
