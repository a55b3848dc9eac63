"""Tables (markdown + JSON) and a bar chart from eval records, on the problems all configurations finished."""

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from fp4reason.eval import stats


def correctness(records: list[dict], configs: list[str] | None = None) -> tuple[list[str], list[str], dict]:
    """(configs, common problem ids, {config: bool array [problems, k]}) where k is the largest number of
    samples that every configuration has for every common problem."""
    by = defaultdict(lambda: defaultdict(dict))
    for r in records:
        by[r["config"]][r["problem_id"]][r["sample"]] = r
    configs = configs or list(dict.fromkeys(r["config"] for r in records))
    missing = [c for c in configs if c not in by]
    if missing:
        raise ValueError(f"no records for configurations {missing}")

    def n_prefix(samples: dict) -> int:
        n = 0
        while n in samples:
            n += 1
        return n

    common = set.intersection(*(set(by[c]) for c in configs))
    pids = [p for p in dict.fromkeys(r["problem_id"] for r in records) if p in common]  # first-seen order
    k = min((n_prefix(by[c][p]) for c in configs for p in pids), default=0)
    if k == 0:
        raise ValueError("no problem has been evaluated by every configuration yet")
    mats = {c: np.array([[by[c][p][j]["correct"] for j in range(k)] for p in pids]) for c in configs}
    return configs, pids, {"by": by, "k": k, "mats": mats}


def summarize(
    records: list[dict],
    configs: list[str] | None = None,
    reference: str | None = None,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict:
    """Per-configuration accuracy (avg@k, pass@k, 95% bootstrap CI), mean response length, truncation and
    no-answer rates; paired comparisons against ``reference`` (default: the first config) and, for every
    "<scheme>+<sampler>" config, against its plain "<scheme>" config, with the share of the reference->scheme
    gap it recovers."""
    configs, pids, d = correctness(records, configs)
    k, mats, by = d["k"], d["mats"], d["by"]
    reference = reference or configs[0]
    rows = {}
    for c in configs:
        recs = [by[c][p][j] for p in pids for j in range(k)]
        rows[c] = {
            **stats.accuracy(mats[c], n_boot=n_boot, seed=seed),
            "mean_tokens": float(np.mean([r["n_tokens"] for r in recs])),
            "truncated": float(np.mean([r["finish_reason"] == "length" for r in recs])),
            "no_answer": float(np.mean([r["pred"] is None for r in recs])),
        }
    comparisons = []
    for c in configs:
        pairs = [(reference, c)] if c != reference else []
        base = c.split("+")[0]
        if "+" in c and base in mats and base != reference:
            pairs.append((base, c))
        for a, b in pairs:
            cmp = {
                "a": a,
                "b": b,
                **stats.paired_bootstrap(mats[a], mats[b], n_boot=n_boot, seed=seed),
                "mcnemar": stats.mcnemar(mats[a], mats[b]),
            }
            if a != reference:
                cmp["gap_recovery"] = stats.gap_recovery(
                    mats[reference], mats[a], mats[b], n_boot=n_boot, seed=seed
                )
            comparisons.append(cmp)
    used = [by[c][p][j] for c in configs for p in pids for j in range(k)]
    return {
        "n_problems": len(pids),
        "k": k,
        "backends": sorted({r["backend"] for r in used if r.get("backend")}),
        "max_new_tokens": sorted({r["max_new_tokens"] for r in used if "max_new_tokens" in r}),
        "reference": reference,
        "configs": rows,
        "comparisons": comparisons,
        "problem_ids": pids,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(summary: dict, title: str = "") -> str:
    k = summary["k"]
    lines = [
        f"## {title}" if title else "",
        "",
        f"{summary['n_problems']} problems x {k} samples; 95% intervals from a bootstrap over problems"
        + "".join(
            f"; {label} {', '.join(map(str, summary.get(key) or []))}"
            for key, label in (("backends", "backend"), ("max_new_tokens", "max new tokens"))
            if summary.get(key)
        )
        + ".",
        "",
        f"| config | avg@{k} % [95% CI] | pass@{k} % [95% CI] | Δ vs {summary['reference']} (pp) [95% CI] "
        "| McNemar p (sample 0) | mean tokens | truncated % | no answer % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    vs_ref = {c["b"]: c for c in summary["comparisons"] if c["a"] == summary["reference"]}
    for name, r in summary["configs"].items():
        lo, hi = r["avg_at_k_ci"]
        plo, phi = r["pass_at_k_ci"]
        cmp = vs_ref.get(name)
        delta = (
            f"{100 * cmp['delta']:+.1f} [{100 * cmp['ci'][0]:+.1f}, {100 * cmp['ci'][1]:+.1f}]"
            if cmp
            else "—"
        )
        p = f"{cmp['mcnemar']['p_exact']:.3g}" if cmp else "—"
        lines.append(
            f"| {name} | {_pct(r['avg_at_k'])} [{_pct(lo)}, {_pct(hi)}] | {_pct(r['pass_at_k'])} "
            f"[{_pct(plo)}, {_pct(phi)}] | {delta} | {p} | {r['mean_tokens']:.0f} | {_pct(r['truncated'])} "
            f"| {_pct(r['no_answer'])} |"
        )
    extra = [c for c in summary["comparisons"] if c["a"] != summary["reference"]]
    if extra:
        lines += [
            "",
            "| comparison | Δ (pp) [95% CI] | bootstrap p | McNemar p | gap recovered [95% CI] |",
            "|---|---|---|---|---|",
        ]
        for c in extra:
            g = c["gap_recovery"]
            rec = (
                f"{100 * g['recovered']:.0f}% [{100 * g['ci'][0]:.0f}%, {100 * g['ci'][1]:.0f}%] of a "
                f"{100 * g['gap']:.1f} pp gap"
                if g["gap"] != 0
                else "n/a (no gap)"
            )
            lines.append(
                f"| {c['b']} vs {c['a']} | {100 * c['delta']:+.1f} [{100 * c['ci'][0]:+.1f}, "
                f"{100 * c['ci'][1]:+.1f}] | {c['p_bootstrap']:.3g} | {c['mcnemar']['p_exact']:.3g} | {rec} |"
            )
    return "\n".join(lines).strip() + "\n"


def bar_chart(summary: dict, path: str | Path, title: str = "") -> None:
    """avg@k per configuration with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["configs"])
    acc = np.array([summary["configs"][n]["avg_at_k"] for n in names]) * 100
    ci = np.array([summary["configs"][n]["avg_at_k_ci"] for n in names]) * 100
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    ax.bar(
        range(len(names)), acc, yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=4, color="tab:blue", alpha=0.8
    )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"avg@{summary['k']} accuracy (%)")
    ax.set_title(title or f"{summary['n_problems']} problems x {summary['k']} samples", fontsize=9)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _atomic(path: str | Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_report(summary: dict, prefix: str | Path, title: str = "") -> list[Path]:
    """Write ``prefix``.md, ``prefix``.json and ``prefix``.png; returns the paths."""
    prefix = Path(prefix)
    md, js, png = (prefix.with_name(prefix.name + ext) for ext in (".md", ".json", ".png"))
    _atomic(md, lambda t: Path(t).write_text(markdown(summary, title), encoding="utf-8"))
    _atomic(js, lambda t: Path(t).write_text(json.dumps(summary, indent=1), encoding="utf-8"))
    bar_chart(summary, png, title)
    return [md, js, png]
