"""Evaluation harness (benchmarks, grading, statistics, reports) and FP4-vs-BF16 entropy diagnostics."""

from fp4reason.eval.data import BENCHMARKS, Problem, load_benchmark, load_jsonl
from fp4reason.eval.grading import extract_answer, grade, last_boxed, last_number
from fp4reason.eval.runner import EvalConfig, ModelPool, parse_config, read_records, run_eval
from fp4reason.eval.stats import (
    accuracy,
    bootstrap_ci,
    gap_recovery,
    mcnemar_exact,
    paired_bootstrap,
    pass_at_k,
)

__all__ = [
    "BENCHMARKS",
    "Problem",
    "load_benchmark",
    "load_jsonl",
    "extract_answer",
    "grade",
    "last_boxed",
    "last_number",
    "EvalConfig",
    "ModelPool",
    "parse_config",
    "read_records",
    "run_eval",
    "accuracy",
    "bootstrap_ci",
    "gap_recovery",
    "mcnemar_exact",
    "paired_bootstrap",
    "pass_at_k",
]
