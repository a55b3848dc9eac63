"""Accuracy statistics over a [problems, k] correctness matrix: avg@k, unbiased pass@k, percentile
bootstrap intervals over problems, paired bootstrap and exact McNemar tests, gap recovery."""

import math

import numpy as np


def _matrix(correct) -> np.ndarray:
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"correctness must be [problems, k] with both > 0, got shape {c.shape}")
    return c


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def per_problem_pass_at_k(correct, k: int) -> np.ndarray:
    c = _matrix(correct)
    n = c.shape[1]
    return np.array([pass_at_k(n, int(row.sum()), k) for row in c])


def bootstrap_ci(values, *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem ``values`` (problems resampled)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def accuracy(correct, *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """avg@k (pass@1 averaged over the k samples) and pass@k, each with a 95% bootstrap interval."""
    c = _matrix(correct)
    k = c.shape[1]
    avg, pk = c.mean(axis=1), per_problem_pass_at_k(c, k)
    return {
        "n_problems": c.shape[0],
        "k": k,
        "avg_at_k": float(avg.mean()),
        "avg_at_k_ci": bootstrap_ci(avg, n_boot=n_boot, seed=seed),
        "pass_at_k": float(pk.mean()),
        "pass_at_k_ci": bootstrap_ci(pk, n_boot=n_boot, seed=seed),
    }


def paired_bootstrap(a, b, *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Difference mean(b) - mean(a) of per-problem accuracies on the same problems, its 95% interval and a
    two-sided bootstrap p-value (twice the smaller tail mass at 0)."""
    a, b = _matrix(a).mean(axis=1), _matrix(b).mean(axis=1)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same problems, got {a.size} and {b.size}")
    d = b - a
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return {
        "delta": float(d.mean()),
        "ci": (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))),
        "p_bootstrap": float(p),
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from discordant counts b (only A right) and c (only B right):
    2 * P[Binomial(b + c, 1/2) <= min(b, c)], capped at 1."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(a, b) -> dict:
    """Exact McNemar test on the first sample of each problem (one paired binary outcome per problem)."""
    a, b = _matrix(a)[:, 0] > 0.5, _matrix(b)[:, 0] > 0.5
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same problems, got {a.size} and {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return {"only_a": only_a, "only_b": only_b, "p_exact": mcnemar_exact(only_a, only_b)}


def gap_recovery(ref, base, method, *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Fraction of the accuracy gap ref -> base that ``method`` recovers, (m - base) / (ref - base), with a
    paired bootstrap interval (problems resampled jointly; resamples with a zero gap are dropped)."""
    r, b, m = (_matrix(x).mean(axis=1) for x in (ref, base, method))
    if not r.shape == b.shape == m.shape:
        raise ValueError("gap recovery needs the same problems in all three configurations")
    gap = r.mean() - b.mean()
    frac = float((m.mean() - b.mean()) / gap) if gap != 0 else float("nan")
    idx = np.random.default_rng(seed).integers(0, r.size, size=(n_boot, r.size))
    g = r[idx].mean(axis=1) - b[idx].mean(axis=1)
    ok = np.abs(g) > 1e-12
    fr = (m[idx].mean(axis=1)[ok] - b[idx].mean(axis=1)[ok]) / g[ok]
    ci = (float(np.quantile(fr, 0.025)), float(np.quantile(fr, 0.975))) if fr.size else (float("nan"),) * 2
    return {"gap": float(gap), "recovered": frac, "ci": ci}
