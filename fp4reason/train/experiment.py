"""A short CPU ReQAT ablation: PTQ vs QAT vs QAT+SEM vs QAT+SEM+Q-FIT vs TAQ (= full ReQAT), all W4A4KV4.

    python -m fp4reason.train.experiment --out runs/reqat_cpu

Data: seeded multi-step arithmetic word problems with worked traces (``synthetic``), disjoint held-out split.
Metrics on the held-out split, all teacher-forced on the reference trace (one forward pass per batch, so it
fits a CPU): completion cross-entropy, *step accuracy* (every computed ``= N`` result predicted exactly by
greedy argmax given the trace so far) and *answer accuracy* (the last result, the problem's answer).
Every W4A4KV4 row is evaluated in the training fake-quant form (dynamic NVFP4 weights/inputs, KV4 keys minus
k_shift and values). Rows: BF16 model; PTQ (RTN) of it; QAT / +SEM / +SEM+Q-FIT from it on the first
``--stage2`` traces; BF16 fine-tune on the first ``--stage1`` traces, its PTQ, and TAQ: Q-FIT + QAT+SEM on the
first ``--stage2`` traces of the same order. Results accumulate in ``<out>/results.json`` (re-runs skip rows
already there).
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from fp4reason.train.data import IGNORE, Example, collate, prompt_ids, write_traces
from fp4reason.train.fakequant import compile_fake_quant, prepare_qat
from fp4reason.train.qfit import qfit
from fp4reason.train.synthetic import make_splits
from fp4reason.train.trainer import TrainConfig, train


def encode(tokenizer, rec: dict, max_len: int) -> tuple[Example, list[list[int]]]:
    """The trace as an example (as ``tokenize_trace``) plus, per target number, its token positions."""
    p = prompt_ids(tokenizer, rec["prompt"])
    enc = tokenizer(rec["completion"], add_special_tokens=False, return_offsets_mapping=True)
    c = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    ids = (p + c)[:max_len]
    spans = [
        [
            len(p) + j
            for j, (s, e) in enumerate(enc["offset_mapping"])
            if s < te and e > ts and len(p) + j < max_len
        ]
        for ts, te in rec["targets"]
    ]
    labels = [IGNORE] * len(p) + c
    return Example(torch.tensor(ids), torch.tensor(labels[:max_len])), spans


@torch.no_grad()
def target_metrics(model, encoded: list, pad_id: int, batch_size: int = 16) -> dict:
    """Held-out completion CE and teacher-forced exact-number accuracy (steps, final answer)."""
    model.eval()
    ce_sum, n_tok, steps_ok, steps, ans_ok = 0.0, 0, 0, 0, 0
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        b = collate([e for e, _ in chunk], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        lg, lb = logits[:, :-1].float(), b["labels"][:, 1:]
        ce_sum += torch.nn.functional.cross_entropy(
            lg.flatten(0, 1), lb.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        n_tok += int((lb != IGNORE).sum())
        pred = logits.argmax(-1)  # pred[:, t] predicts token t + 1
        for r, (_, spans) in enumerate(chunk):
            ok = [
                all(pred[r, t - 1] == b["input_ids"][r, t] for t in span) and len(span) > 0 for span in spans
            ]
            steps_ok, steps, ans_ok = steps_ok + sum(ok), steps + len(ok), ans_ok + ok[-1]
    return {
        "loss": ce_sum / n_tok,
        "step_acc": steps_ok / steps,
        "answer_acc": ans_ok / len(encoded),
        "n_problems": len(encoded),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="runs/reqat_cpu")
    ap.add_argument("--n-train", type=int, default=384)
    ap.add_argument("--n-test", type=int, default=96)
    ap.add_argument("--stage1", type=int, default=384, help="TAQ stage-1 (BF16) traces")
    ap.add_argument("--stage2", type=int, default=192, help="QAT traces (a prefix of stage 1's order)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--sem", type=float, default=0.1)
    ap.add_argument("--grid", type=int, default=10, help="Q-FIT grid per alpha")
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--calib-seqs", type=int, default=8, help="Q-FIT calibration sequences (built-in text)")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--rows", default="bf16,ptq,qat,qat_sem,qat_sem_qfit,ft_bf16,ft_ptq,taq_reqat")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    compile_fake_quant(True)  # same numerics, ~10x faster quantize-dequantize on CPU

    from fp4reason.models import load_model
    from fp4reason.quant import calibration_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    base, tok = load_model(args.model, dtype=torch.float32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_recs, test_recs = make_splits(args.n_train, args.n_test)
    write_traces(out / "traces_train.jsonl", train_recs)
    write_traces(out / "traces_test.jsonl", test_recs)
    train_ex = [encode(tok, r, args.max_len)[0] for r in train_recs]
    test_enc = [encode(tok, r, args.max_len) for r in test_recs]
    n_cal = args.calib_seqs * args.calib_len
    cal = torch.tensor(tok(calibration_text(), add_special_tokens=False)["input_ids"][:n_cal])
    cal = cal.view(args.calib_seqs, args.calib_len)

    def cfg(name: str, qat: bool, sem: float, n: int) -> TrainConfig:
        return TrainConfig(
            out_dir=str(out / name),
            qat=qat,
            sem_lambda=sem,
            num_traces=n,
            batch_size=args.batch_size,
            grad_accum=1,
            lr=args.lr,
            warmup_ratio=0.1,
            save_every=0,
            save_final=False,
            resume=False,
            max_len=args.max_len,
            compile_fake_quant=True,
        )

    def record(name: str, model, t0: float, extra: dict | None = None) -> None:
        results[name] = {**target_metrics(model, test_enc, pad), **(extra or {}), "wall_s": time.time() - t0}
        tmp = res_path.with_name(res_path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, res_path)
        print(name, json.dumps(results[name]), flush=True)

    rows = args.rows.split(",")
    ft = None
    for row in rows:
        if row in results:
            continue
        t0 = time.time()
        extra = {}
        if row == "bf16":
            m = base
        elif row == "ptq":
            m = prepare_qat(copy.deepcopy(base))
        elif row in ("qat", "qat_sem", "qat_sem_qfit"):
            m = copy.deepcopy(base)
            if row == "qat_sem_qfit":
                extra["qfit"] = [vars(f) for f in qfit(m, cal, grid=args.grid)]
            extra["train"] = train(
                cfg(row, True, args.sem if "sem" in row else 0.0, args.stage2),
                model=m,
                tokenizer=tok,
                examples=train_ex,
            )
        elif row in ("ft_bf16", "ft_ptq", "taq_reqat"):
            if ft is None:
                ft = copy.deepcopy(base)
                s = train(cfg("ft_bf16", False, 0.0, args.stage1), model=ft, tokenizer=tok, examples=train_ex)
                extra["train_stage1"] = s
            if row == "ft_bf16":
                m = ft
            elif row == "ft_ptq":
                m = prepare_qat(copy.deepcopy(ft))
            else:
                m = copy.deepcopy(ft)
                extra["qfit"] = [vars(f) for f in qfit(m, cal, grid=args.grid)]
                extra["train"] = train(
                    cfg(row, True, args.sem, args.stage2), model=m, tokenizer=tok, examples=train_ex
                )
        else:
            raise ValueError(f"unknown row {row!r}")
        record(row, m, t0, extra)

    print("\n| row | held-out loss | step acc | answer acc |\n|---|---|---|---|")
    for row in rows:
        r = results[row]
        print(f"| {row} | {r['loss']:.4f} | {r['step_acc']:.3f} | {r['answer_acc']:.3f} |")


if __name__ == "__main__":
    main()
