"""ReQAT trainer: BF16 fine-tuning (TAQ stage 1) or W4A4KV4 fake-quant QAT with SEM (stage 2), on accelerate.

Single process (``--prompts`` first writes ``--traces`` with the teacher, by default the model itself)::

    fp4reason train --model smollm2-135m --prompts problems.jsonl --traces traces.jsonl --out runs/stage1 \\
        --num-traces 4000
    fp4reason qfit  --model runs/stage1/final --out runs/stage1-qfit
    fp4reason train --model runs/stage1-qfit --traces traces.jsonl --out runs/stage2 --qat --sem 0.1 \\
        --num-traces 1000 --export-fp4

Several GPUs of one node (FSDP2; layers wrapped per the model's ``_no_split_modules``)::

    accelerate launch --config_file configs/fsdp.yaml --num_processes 8 -m fp4reason train \\
        --model runs/stage1-qfit --traces traces.jsonl --out runs/stage2 --qat --sem 0.1 --num-traces 1000

``--batch-size``/``--grad-accum`` are per process. Whatever the batch layout, a stage with ``--num-traces N``
consumes the first N traces (rounded down to whole steps) of one seeded order, so stage 2 is a prefix of 1.

Kill and re-run the same command: it resumes from the last checkpoint in ``<out>/checkpoints`` (model,
optimizer, scheduler, RNG and data position via accelerate's ``save_state``/``load_state``) and ends with the
same weights as an uninterrupted run. The loss is summed over completion tokens and divided by the
completion-token count of the whole accumulated step (per process), SEM's threshold is per micro-batch.
"""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fp4reason.train.data import (
    IGNORE,
    Example,
    collate,
    epoch_orders,
    read_traces,
    step_schedule,
    tokenize_trace,
)
from fp4reason.train.fakequant import compile_fake_quant, prepare_qat, strip_qat
from fp4reason.train.losses import chunked_cross_entropy
from fp4reason.train.qfit import K_SHIFT_FILE, k_shift_state, load_k_shift, save_k_shift
from fp4reason.train.sem import sem_penalty

CKPT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    model: str = ""
    traces: str = ""
    out_dir: str = "runs/train"
    qat: bool = False  # W4A4 (+KV4) fake quant
    kv_quant: bool = True
    compile_fake_quant: bool = False  # CPU: torch.compile the quantize-dequantize (CUDA uses Triton kernels)
    step_weights: bool = False  # fake-quantize each weight once per forward (same numerics; not with FSDP)
    sem_lambda: float = 0.0  # ReQAT: 0.1
    sem_percentile: float = 0.75
    num_traces: int | None = None  # first N traces of the seeded order (TAQ subset); None = all
    epochs: int = 1
    batch_size: int = 1
    grad_accum: int = 2
    max_len: int = 4096
    lr: float = 1e-5
    warmup_ratio: float = 0.03
    min_lr_rate: float = 0.01
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "float32"  # master weights (bf16 autocast comes from mixed_precision)
    mixed_precision: str = "bf16"  # "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    save_every: int = 50  # <= 0: no checkpoints (no resume)
    keep_checkpoints: int = 2
    resume: bool = True
    stop_after: int | None = None  # stop after this many steps in this run (time slicing, tests)
    save_final: bool = True  # write <out>/final (HF dir + k_shift.safetensors)
    export_fp4: bool = False  # also write <out>/fp4: compressed-tensors NVFP4 W4A4KV4 + k_shift.safetensors
    progress: bool = True


class _Position:
    """The data position, saved with the accelerate state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def load_for_training(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``fp4reason.models.load_model`` plus the Q-FIT ``k_shift.safetensors`` next to the weights, if any."""
    from fp4reason.models import load_model

    model, tok = load_model(name_or_path, dtype=dtype)
    if getattr(model.config, "quantization_config", None):
        raise ValueError(f"{name_or_path} is a quantized checkpoint; start from the BF16/FP32 model")
    shift = Path(name_or_path) / K_SHIFT_FILE
    if shift.is_file():
        load_k_shift(model, shift)
    return model, tok


def lm_loss(model, batch: dict, denom: float, sem_lambda: float = 0.0, percentile: float = 0.75):
    """(loss to backprop, CE sum, SEM mean, label tokens) for one micro-batch; next-token shift here."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    n = (labels != IGNORE).sum()
    ce = chunked_cross_entropy(logits, labels, ignore_index=IGNORE)
    sem = sem_penalty(logits, labels, percentile=percentile) if sem_lambda else ce.new_zeros(())
    return (ce + sem_lambda * sem * n) / denom, ce.detach(), sem.detach(), int(n)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], batch_size: int = 8, pad_id: int = 0) -> float:
    """Mean completion-token cross-entropy (nats) of ``model`` on ``examples``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        _, ce, _, n = lm_loss(model, b, 1.0)
        total, count = total + ce.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def _checkpoints(out: Path) -> list[Path]:
    d = out / CKPT_DIR
    return sorted(p for p in d.glob("step_*") if (p / "complete").is_file()) if d.is_dir() else []


def train(cfg: TrainConfig, model=None, tokenizer=None, examples: list[Example] | None = None) -> dict:
    """Run (or resume) one training stage; returns a summary. ``model``/``examples`` override loading
    ``cfg.model``/``cfg.traces`` (used by tests and the CPU experiment)."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    try:
        return _train(acc, cfg, model, tokenizer, examples)
    finally:
        if acc.num_processes == 1:  # let a later stage in this process pick another mixed precision
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()


def _train(acc, cfg: TrainConfig, model, tokenizer, examples: list[Example] | None) -> dict:
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    out = Path(cfg.out_dir)
    set_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_for_training(cfg.model, getattr(torch, cfg.dtype))
    if examples is None:
        if tokenizer is None:
            raise ValueError("tokenizing traces needs a tokenizer")
        traces = read_traces(cfg.traces)
        examples = [tokenize_trace(tokenizer, t, cfg.max_len) for t in traces]
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    ids = epoch_orders(len(examples), cfg.seed, cfg.num_traces or len(examples), cfg.epochs)
    schedule = step_schedule(ids, cfg.batch_size, cfg.grad_accum, acc.num_processes)
    total = len(schedule)

    if cfg.qat:
        if cfg.step_weights and acc.distributed_type.name == "FSDP":
            raise ValueError("step_weights needs every weight on one device; it does not work under FSDP")
        compile_fake_quant(cfg.compile_fake_quant)
        prepare_qat(model, kv=cfg.kv_quant, step_weights=cfg.step_weights)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, math.ceil(cfg.warmup_ratio * total), total, min_lr_rate=cfg.min_lr_rate
    )
    model, opt = acc.prepare(model, opt)
    pos = _Position()
    acc.register_for_checkpointing(sched, pos)

    ckpts = _checkpoints(out)
    if not cfg.resume and ckpts and acc.is_main_process:  # starting over: old checkpoints must not be resumed
        shutil.rmtree(out / CKPT_DIR)
    acc.wait_for_everyone()
    if cfg.resume and ckpts:
        acc.load_state(str(ckpts[-1]))
        acc.print(f"resumed from {ckpts[-1]} (step {pos.step}/{total})")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        _truncate_log(out / LOG_FILE, pos.step)
        unwrapped = acc.unwrap_model(model)
        if k_shift_state(unwrapped):
            save_k_shift(unwrapped, out / K_SHIFT_FILE)

    device, rank, world = acc.device, acc.process_index, acc.num_processes
    start, t0, tokens = pos.step, time.time(), 0
    end = total if cfg.stop_after is None else min(total, start + cfg.stop_after)
    bar = tqdm(
        range(start, end),
        initial=start,
        total=total,
        disable=not (cfg.progress and acc.is_main_process),
        desc="QAT" if cfg.qat else "fine-tune",
    )
    for step in bar:
        micro = [mb for m, mb in enumerate(schedule[step]) if m % world == rank]
        batches = [collate([examples[i] for i in mb], pad_id) for mb in micro]
        denom = max(1, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches))
        loss_sum, ce_sum, sem_sum = 0.0, 0.0, 0.0
        for j, b in enumerate(batches):
            b = {k: v.to(device) for k, v in b.items()}
            with acc.no_sync(model) if j < len(batches) - 1 else nullcontext():
                loss, ce, sem, n = lm_loss(model, b, denom, cfg.sem_lambda, cfg.sem_percentile)
                acc.backward(loss)
            loss_sum, ce_sum, sem_sum = loss_sum + loss.item(), ce_sum + ce.item(), sem_sum + sem.item() * n
            tokens += int(b["attention_mask"].sum())
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        pos.step = step + 1
        rec = {
            "step": pos.step,
            "loss": loss_sum,
            "ce": ce_sum / denom,
            "sem": sem_sum / denom,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "traces": sum(micro, []),
            "tokens_per_s": tokens / (time.time() - t0),
        }
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
        if acc.is_main_process:
            with (out / LOG_FILE).open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if cfg.save_every > 0 and (pos.step % cfg.save_every == 0 or pos.step == end):
            _save_checkpoint(acc, out, pos.step, cfg.keep_checkpoints)

    summary = {
        "steps_done": pos.step,
        "total_steps": total,
        "finished": pos.step == total,
        "tokens_per_s": tokens / max(time.time() - t0, 1e-9),
    }
    if pos.step == total and cfg.save_final:
        final = out / "final"
        unwrapped = acc.unwrap_model(model)
        state = acc.get_state_dict(model)
        if acc.is_main_process:
            strip_qat(unwrapped)
            tmp = out / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if k_shift_state(unwrapped):
                save_k_shift(unwrapped, tmp / K_SHIFT_FILE)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if cfg.qat:
                prepare_qat(unwrapped, kv=cfg.kv_quant, step_weights=cfg.step_weights)
            if cfg.export_fp4:  # from the saved weights: the same path on one process or under FSDP
                from fp4reason.train.export import export_fp4

                fresh, tok = load_for_training(str(final), torch.float32)
                summary["fp4"] = str(export_fp4(fresh, tok, out / "fp4", progress=cfg.progress))
        summary["final"] = str(final)
    acc.wait_for_everyone()
    acc.end_training()
    acc.unwrap_model(model, keep_fp32_wrapper=False)  # drop accelerate's autocast forward wrapper
    return summary


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint we resume from); all when starting over."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _save_checkpoint(acc, out: Path, step: int, keep: int) -> None:
    """accelerate ``save_state`` into a temp dir, renamed into place and marked complete; prune old ones."""
    d = out / CKPT_DIR / f"step_{step:07d}"
    tmp = out / CKPT_DIR / f".tmp_step_{step:07d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "complete").write_text(str(step))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        for old in _checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
