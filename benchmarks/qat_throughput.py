"""Training throughput: fake-quant W4A4KV4 QAT (+SEM) against BF16 fine-tuning, same model and data.

A randomly initialised Qwen3-0.6B-shaped model (config below), fp32 master weights, bf16 autocast, AdamW,
sequence 2048, batch 1, completion-only loss on the second half. Prints tokens/s per mode and the step-time
ratio against BF16 (ReQAT target: QAT step <= 1.5x a BF16 step), and writes JSON.

    python benchmarks/qat_throughput.py --out benchmarks/results/qat_throughput_h100.json
    python benchmarks/qat_throughput.py --tiny   # CPU smoke run

A mode is ``bf16`` or ``qat`` plus options joined by ``_``: ``sem`` (SEM loss), ``compiled`` (torch.compiled
quantize-dequantize kernels), ``triton`` (the Triton kernels of ``fp4reason.kernels.fakequant``; without
either, eager torch), ``noshare`` (fake-quantize the shared q/k/v and gate/up input once per Linear,
the path before input sharing), ``stepw`` (every weight fake-quantized once per step in one batched call per
shape). ``noshare``/``stepw`` change no number, and ``triton`` equals eager torch bit for bit (tested on the
H100); ``compiled`` does on CPU only (inductor divides approximately on CUDA). The first-step loss of every
QAT mode with the same ``sem`` and family (eager torch or triton; compiled) must equal bit for bit, else the
script exits 1 after printing the table.

``--profile``: after timing a mode, one more step runs under ``torch.profiler``; the top-30 ops by self
CUDA time (CPU time on a CPU) go to ``<dir of --out>/qat_profile_<mode>.txt``.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
)
TINY = dict(
    QWEN3_0_6B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def build(cfg: dict, device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly (seconds, not a minute, for 0.6B)
        model = AutoModelForCausalLM.from_config(
            Qwen3Config(**cfg), dtype=torch.float32, attn_implementation="sdpa"
        )
    return model.train()


OPTIONS = {"sem", "compiled", "triton", "noshare", "stepw"}


def mode_options(mode: str) -> set[str]:
    kind, *opts = mode.split("_")
    bad = [o for o in opts if o not in OPTIONS] + ([] if kind in ("bf16", "qat") else [kind])
    if bad or (kind == "bf16" and opts) or {"compiled", "triton"} <= set(opts):
        raise SystemExit(
            f"bad mode {mode!r}: bf16, or qat with options from {sorted(OPTIONS)} joined by '_' "
            "(at most one of compiled/triton)"
        )
    return set(opts) | {kind}


def run_mode(mode: str, cfg: dict, args, device) -> dict:
    from fp4reason.train.fakequant import compile_fake_quant, prepare_qat
    from fp4reason.train.losses import chunked_cross_entropy
    from fp4reason.train.sem import sem_penalty

    opts = mode_options(mode)
    model = build(cfg, device)
    compile_fake_quant("triton" if "triton" in opts else "compiled" if "compiled" in opts else "eager")
    if "qat" in opts:
        prepare_qat(model, share_inputs="noshare" not in opts, step_weights="stepw" in opts)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq + 1), generator=g).to(device)
    labels = ids[:, 1:].clone()
    labels[:, : args.seq // 2] = -100
    n_label = int((labels != -100).sum())
    sem = "sem" in opts
    first_loss = None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        loss = chunked_cross_entropy(logits, labels) / n_label  # the trainer's loss path
        if sem:
            loss = loss + 0.1 * sem_penalty(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step()
        if first_loss is None:
            first_loss = loss.item()  # after the step (the timed loop syncs anyway): same value
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    if args.profile:
        profile_step(mode, train_step, args, cuda)
    res = {
        "step_s_median": step_s,
        "step_s_all": times,
        "tokens_per_s": args.batch * args.seq / step_s,
        "loss": loss.item(),
        "first_loss": first_loss,
    }
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    model = opt = None  # free the memory before the next mode (train_step holds them too)
    if cuda:
        torch.cuda.empty_cache()
    return res


def profile_step(mode: str, train_step, args, cuda: bool) -> None:
    """One more step under torch.profiler; the top-30 ops by self device (CPU) time to a text file."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        train_step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    out = (Path(args.out).parent if args.out else Path(".")) / f"qat_profile_{mode}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(f"{mode}: one training step, top 30 by {key}\n{table}\n")
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short sequence (CPU smoke test)")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every mode")
    ap.add_argument("--profile", action="store_true", help="a torch.profiler table per mode (see above)")
    ap.add_argument(
        "--modes", default=None, help="comma list, e.g. bf16,qat_compiled,qat_compiled_stepw (see above)"
    )
    args = ap.parse_args()
    # a compiled quantizer that silently fell back to eager would make its mode look slow: fail instead
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TINY if args.tiny else QWEN3_0_6B
    args.seq = args.seq or (64 if args.tiny else 2048)
    gpu_modes = "qat_compiled_stepw,qat_triton,qat_triton_stepw,qat_sem_triton_stepw"
    default = "bf16," + ("qat_noshare,qat,qat_stepw,qat_sem_stepw" if device.type == "cpu" else gpu_modes)
    modes = (args.modes or default).split(",")
    for mode in modes:
        mode_options(mode)
    if modes[0] != "bf16":
        modes.insert(0, "bf16")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {name}, {'tiny' if args.tiny else 'Qwen3-0.6B-shaped'} model, seq {args.seq}, "
        f"batch {args.batch}"
    )
    print(f"{'mode':<24}{'step (s)':>10}{'tokens/s':>12}{'x BF16 step':>13}", flush=True)
    results = {}
    for mode in modes:  # printed and written after every mode: a timeout keeps what finished
        r = results[mode] = run_mode(mode, cfg, args, device)
        r["ratio_vs_bf16"] = r["step_s_median"] / results["bf16"]["step_s_median"]
        print(
            f"{mode:<24}{r['step_s_median']:>10.4f}{r['tokens_per_s']:>12.0f}{r['ratio_vs_bf16']:>13.2f}",
            flush=True,
        )
        if args.out:
            write(args, cfg, name, results)
    if args.out:
        print(f"wrote {args.out}")
    check_same_numbers(results)


def check_same_numbers(results: dict) -> None:
    """QAT modes that differ only in ``noshare``/``stepw`` (or eager vs triton) must give the same
    first-step loss, bit for bit."""
    families: dict[tuple, list[str]] = {}
    for mode in results:
        opts = mode_options(mode)
        if "qat" in opts:
            families.setdefault(("sem" in opts, "compiled" in opts), []).append(mode)
    bad = []
    for modes in families.values():
        ref = results[modes[0]]["first_loss"]
        bad += [
            f"{m}: {results[m]['first_loss']!r} != {modes[0]}: {ref!r}"
            for m in modes[1:]
            if results[m]["first_loss"] != ref
        ]
    if bad:
        print("NUMERICS MISMATCH (these modes must be identical):\n  " + "\n  ".join(bad))
        raise SystemExit(1)
    print(
        "first-step losses identical within each QAT family: "
        + "; ".join(", ".join(m) for m in families.values())
    )


def write(args, cfg: dict, name: str, results: dict) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": name,
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else "qwen3-0.6b-shaped",
        "config": cfg,
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "grad_ckpt": args.grad_ckpt,
        "results": results,
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
