"""Reasoning traces for TAQ: loading, completion-only tokenization, and the shared seeded order.

A trace file is JSONL, one ``{"prompt": str, "completion": str}`` per line (the completion is the reasoning
trace plus answer; extra keys are kept). TAQ (trace-aligned QAT) trains stage 1 (BF16) and stage 2 (QAT)
on the *same* traces: both stages walk one seeded permutation of the file, stage 1 its first ``n1`` traces,
stage 2 its first ``n2 <= n1``, so stage 2's data is a prefix of stage 1's, in the same order.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


def read_traces(path: "str | os.PathLike") -> list[dict]:
    """Read a JSONL trace file; every line needs string ``prompt`` and ``completion``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    traces = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
                raise ValueError(f"{path}:{i}: each line needs string fields 'prompt' and 'completion'")
            traces.append(rec)
    if not traces:
        raise ValueError(f"trace file {path} is empty")
    return traces


def write_traces(path: "str | os.PathLike", traces: list[dict]) -> None:
    """Write traces as JSONL atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for t in traces:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model sees it: a user turn through the chat template if there is one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@dataclass
class Example:
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE on the prompt


def tokenize_trace(tokenizer, trace: dict, max_len: int) -> Example:
    """Prompt + completion + EOS, truncated to ``max_len``; only completion tokens (and EOS) are labels."""
    p = prompt_ids(tokenizer, trace["prompt"])
    c = tokenizer(trace["completion"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = (p + c)[:max_len]
    labels = ([IGNORE] * len(p) + c)[:max_len]
    return Example(torch.tensor(ids), torch.tensor(labels))


def trace_order(num_traces: int, seed: int) -> list[int]:
    """The seeded permutation both TAQ stages walk."""
    return torch.randperm(num_traces, generator=torch.Generator().manual_seed(seed)).tolist()


def epoch_orders(num_traces: int, seed: int, take: int, epochs: int) -> list[int]:
    """Trace ids for all epochs: epoch 0 is ``trace_order(...)[:take]``; later epochs re-shuffle those ids."""
    if not 0 < take <= num_traces:
        raise ValueError(f"cannot take {take} of {num_traces} traces")
    first = trace_order(num_traces, seed)[:take]
    out = list(first)
    for e in range(1, epochs):
        out += [first[i] for i in trace_order(take, seed + e)]
    return out


def step_schedule(ids: list[int], batch_size: int, grad_accum: int, world: int = 1) -> list[list[list[int]]]:
    """Split trace ids into optimizer steps -> (grad_accum x world) micro-batches of ``batch_size``.

    ``schedule[step][m]`` is the m-th micro-batch of that step; process ``r`` takes ``m % world == r``.
    A trailing partial step is dropped.
    """
    per_step = batch_size * grad_accum * world
    steps = len(ids) // per_step
    if steps == 0:
        raise ValueError(f"{len(ids)} traces are fewer than one optimizer step ({per_step})")
    return [
        [
            ids[s * per_step + m * batch_size : s * per_step + (m + 1) * batch_size]
            for m in range(grad_accum * world)
        ]
        for s in range(steps)
    ]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels [B, T]."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
