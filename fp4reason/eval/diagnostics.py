"""Where FP4 changes the next-token distribution (the ReQAT paper's Section 3 analysis, on our models).

BF16 traces are teacher-forced through the BF16 and the FP4 model; per generated position we compare the two
distributions: top-1 flip, tail mass M = 1 - p_top1 (each model its own top-1), KL(BF16 || FP4) and the
entropy shift H_FP4 - H_BF16. Positions are pooled and split into 20 equal-count bins of BF16 entropy,
and into token classes (digits/operators, words, other). Per group, rho = (mean M_FP4 + eps) /
(mean M_BF16 + eps), a ratio of means that tokens with M_BF16 ~ 0 cannot blow up (the per-token median is
also given). Reasoning steps are split on blank lines as in ReSET; a step is "uncertain" if its mean BF16
entropy exceeds the trace mean, and we report the entropy shift of the highest-entropy tokens (top 10% of
BF16 entropy, and H >= 2 nats) inside uncertain steps.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EPS = 1e-6
N_BINS = 20
TOP_FRACTION = 0.10
CLASSES = ("symbolic", "word", "other")
_SYMBOLIC = re.compile(r"[\d+\-*/=^<>%×÷·√±≤≥]")


def token_class(text: str) -> str:
    """ "symbolic" (contains a digit or an arithmetic operator), "word" (letters), or "other"."""
    t = text.strip()
    if _SYMBOLIC.search(t):
        return "symbolic"
    if re.search(r"[^\W\d_]", t):
        return "word"
    return "other"


def step_ids(pieces: list[str]) -> np.ndarray:
    """Step index of each token: a new step starts after a token containing a blank line ("\\n\\n") or after
    two consecutive tokens that are exactly "\\n" (ReSET's boundary rule)."""
    out, step = np.zeros(len(pieces), dtype=np.int64), 0
    for i, piece in enumerate(pieces):
        out[i] = step
        if "\n\n" in piece or (piece == "\n" and i > 0 and pieces[i - 1] == "\n"):
            step += 1
    return out


@dataclass
class TokenStats:
    """Per generated position of all traces, concatenated."""

    h_bf16: np.ndarray
    h_fp4: np.ndarray
    tail_bf16: np.ndarray
    tail_fp4: np.ndarray
    flip: np.ndarray
    kl: np.ndarray
    cls: np.ndarray  # token class name per position
    in_uncertain_step: np.ndarray


def encode_traces(tokenizer, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    """(chat-templated prompt ids, response ids) per pair; empty responses are dropped."""
    from fp4reason.eval.prompts import chat_text

    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        trace = tokenizer(response, add_special_tokens=False)["input_ids"]
        if trace:
            out.append(
                (tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False)["input_ids"], trace)
            )
    return out


def _logits_for_trace(model, prompt_ids: list[int], trace_ids: list[int]) -> torch.Tensor:
    """float32 logits [len(trace), V] that predict each trace token given everything before it."""
    ids = torch.tensor([prompt_ids + trace_ids[:-1]], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 :]
    return logits.float()


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


@torch.inference_mode()
def teacher_force(model_bf16, model_fp4, tokenizer, traces: list[tuple[list[int], list[int]]]) -> TokenStats:
    """Compare both models on every position of every (prompt ids, trace ids) pair."""
    cols = {k: [] for k in TokenStats.__dataclass_fields__}
    for prompt_ids, trace_ids in traces:
        if not prompt_ids or not trace_ids:
            raise ValueError("each trace needs a non-empty prompt and a non-empty generated part")
        lb = torch.log_softmax(_logits_for_trace(model_bf16, prompt_ids, trace_ids), -1)
        lq = torch.log_softmax(_logits_for_trace(model_fp4, prompt_ids, trace_ids), -1)
        if lb.shape != lq.shape:
            raise ValueError(f"models disagree on the vocabulary: {tuple(lb.shape)} vs {tuple(lq.shape)}")
        hb = _entropy(lb)
        cols["h_bf16"].append(hb.cpu().numpy())
        cols["h_fp4"].append(_entropy(lq).cpu().numpy())
        cols["tail_bf16"].append((1 - lb.max(-1).values.exp()).cpu().numpy())
        cols["tail_fp4"].append((1 - lq.max(-1).values.exp()).cpu().numpy())
        cols["flip"].append((lb.argmax(-1) != lq.argmax(-1)).cpu().numpy())
        cols["kl"].append((lb.exp() * (lb - lq)).sum(-1).clamp_min(0).cpu().numpy())
        pieces = [tokenizer.decode([t]) for t in trace_ids]
        cols["cls"].append(np.array([token_class(p) for p in pieces]))
        steps = step_ids(pieces)
        hbn = hb.cpu().numpy()
        step_mean = np.bincount(steps, weights=hbn) / np.bincount(steps)
        cols["in_uncertain_step"].append(step_mean[steps] > hbn.mean())
    return TokenStats(**{k: np.concatenate(v) for k, v in cols.items()})


def _metrics(s: TokenStats, m: np.ndarray) -> dict:
    if not m.any():
        return {"n": 0}
    return {
        "n": int(m.sum()),
        "h_bf16": float(s.h_bf16[m].mean()),
        "flip_rate": float(s.flip[m].mean()),
        "rho": float((s.tail_fp4[m].mean() + EPS) / (s.tail_bf16[m].mean() + EPS)),
        "rho_median": float(np.median((s.tail_fp4[m] + EPS) / (s.tail_bf16[m] + EPS))),
        "kl": float(s.kl[m].mean()),
        "entropy_shift": float((s.h_fp4[m] - s.h_bf16[m]).mean()),
    }


def analyze_stats(s: TokenStats, n_bins: int = N_BINS) -> dict:
    """Metrics per BF16-entropy bin (equal-count, ascending), per token class and per bin x class, and
    the entropy shift of the highest-entropy tokens in uncertain steps against all other tokens."""
    n = s.h_bf16.size
    if n < n_bins:
        raise ValueError(f"need at least {n_bins} token positions for {n_bins} bins, got {n}")
    order = np.argsort(s.h_bf16, kind="stable")
    bin_of = np.empty(n, dtype=np.int64)
    for b, idx in enumerate(np.array_split(order, n_bins)):
        bin_of[idx] = b
    bins = [_metrics(s, bin_of == b) for b in range(n_bins)]
    by_class = {c: _metrics(s, s.cls == c) for c in CLASSES}
    bins_by_class = {c: [_metrics(s, (bin_of == b) & (s.cls == c)) for b in range(n_bins)] for c in CLASSES}
    top = s.h_bf16 >= np.quantile(s.h_bf16, 1 - TOP_FRACTION)
    hi = top & s.in_uncertain_step
    return {
        "n_tokens": n,
        "n_bins": n_bins,
        "bins": bins,
        "by_class": by_class,
        "bins_by_class": bins_by_class,
        "overall": _metrics(s, np.ones(n, dtype=bool)),
        "high_entropy_in_uncertain_steps": _metrics(s, hi),
        "high_entropy_elsewhere": _metrics(s, top & ~s.in_uncertain_step),
        "h_ge_2_in_uncertain_steps": _metrics(
            s, (s.h_bf16 >= 2.0) & s.in_uncertain_step
        ),  # the paper's H >= 2
        "other_tokens": _metrics(s, ~hi),
        "low_entropy_half": _metrics(s, bin_of < n_bins // 2),
    }


def summary_text(res: dict, title: str = "") -> str:
    b, o = res["bins"], res["overall"]
    lo, hi = res["low_entropy_half"], res["high_entropy_in_uncertain_steps"]
    lines = [
        title or "FP4 vs BF16 on BF16 traces (teacher-forced)",
        f"tokens: {res['n_tokens']}; overall flip rate {o['flip_rate']:.4f}, KL {o['kl']:.4f} nats, "
        f"tail-mass ratio rho {o['rho']:.3f}, entropy shift {o['entropy_shift']:+.4f} nats",
        f"lowest-entropy bin (mean H {b[0]['h_bf16']:.3f}): flip {b[0]['flip_rate']:.4f}, "
        f"rho {b[0]['rho']:.2f}, "
        f"KL {b[0]['kl']:.4f}",
        f"highest-entropy bin (mean H {b[-1]['h_bf16']:.3f}): flip {b[-1]['flip_rate']:.4f}, "
        f"rho {b[-1]['rho']:.2f}, KL {b[-1]['kl']:.4f}",
        f"low-entropy half: rho {lo['rho']:.2f}, entropy shift {lo['entropy_shift']:+.4f} nats",
    ]
    if hi["n"]:
        lines.append(
            f"top-{int(100 * TOP_FRACTION)}% entropy tokens inside uncertain steps (n={hi['n']}): entropy "
            f"shift {hi['entropy_shift']:+.4f} nats "
            f"(other tokens {res['other_tokens']['entropy_shift']:+.4f})"
        )
    h2 = res["h_ge_2_in_uncertain_steps"]
    if h2["n"]:
        lines.append(
            f"tokens with H_BF16 >= 2 nats inside uncertain steps (n={h2['n']}): entropy shift "
            f"{h2['entropy_shift']:+.4f} nats, flip {h2['flip_rate']:.4f}"
        )
    for c, m in res["by_class"].items():
        if m["n"]:
            lines.append(
                f"class {c:8s} n={m['n']:6d}: mean H {m['h_bf16']:.3f}, flip {m['flip_rate']:.4f}, "
                f"rho {m['rho']:.2f}, KL {m['kl']:.4f}, shift {m['entropy_shift']:+.4f}"
            )
    return "\n".join(lines) + "\n"


def plot(res: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per metric against BF16-entropy bin: all tokens and each token class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = np.arange(res["n_bins"])
    paths = []
    for key, label, logy in [
        ("flip_rate", "top-1 flip rate", False),
        ("rho", "tail-mass ratio ρ (FP4/BF16)", True),
        ("kl", "KL(BF16 ‖ FP4) [nats]", True),
        ("entropy_shift", "H_FP4 − H_BF16 [nats]", False),
    ]:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(x, [m.get(key, np.nan) for m in res["bins"]], "o-", color="black", label="all tokens")
        for c in CLASSES:
            ys = [m.get(key, np.nan) if m["n"] else np.nan for m in res["bins_by_class"][c]]
            ax.plot(x, ys, ".--", label=c, alpha=0.7)
        if logy:
            ax.set_yscale("log")
        if key == "rho":
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("BF16 entropy bin (equal-count, low → high)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_analysis(res: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """summary.txt, stats.json and the plots under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in [("summary.txt", summary_text(res, title)), ("stats.json", json.dumps(res, indent=1))]:
        path = out_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths + plot(res, out_dir)


def analyze_models(
    model_bf16,
    model_fp4,
    tokenizer,
    problems,
    backend,
    out_dir: str | Path,
    *,
    max_new_tokens: int = 512,
    seed: int = 0,
    responses: list[str] | None = None,
    title: str = "",
) -> dict:
    """Generate BF16 traces for ``problems`` with ``backend`` at T=0.6 / top-p 0.95 (or take ``responses``),
    teacher-force them through both models, and write the analysis to ``out_dir``."""
    from fp4reason.eval.prompts import user_prompt
    from fp4reason.sampling import SamplerConfig

    prompts = [user_prompt(p) for p in problems]
    if responses is None:
        sampler = SamplerConfig(mode="fixed", temperature=0.6, top_p=0.95)
        responses = [c.text for c in backend.generate(prompts, sampler, max_new_tokens, seed)]
    traces = encode_traces(tokenizer, prompts, responses)
    if not traces:
        raise ValueError("all traces are empty: nothing to analyze")
    res = analyze_stats(teacher_force(model_bf16, model_fp4, tokenizer, traces))
    res["n_traces"] = len(traces)
    write_analysis(res, out_dir, title)
    return res
