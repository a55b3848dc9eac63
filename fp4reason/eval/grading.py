"""Answer extraction and grading: last ``\\boxed{}`` (fallback: last number), math-verify for math answers,
numeric comparison for GSM8K, a letter pattern for multiple choice."""

import re

from fp4reason.eval.data import Problem

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces respected; None if absent
    or unclosed."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed ("1,234.5" -> "1234.5")."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def extract_answer(text: str, kind: str = "math") -> str | None:
    """The predicted answer string of a response, or None if none can be found."""
    if kind == "choice":
        return extract_choice(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    return last_number(text)


def extract_choice(text: str) -> str | None:
    """The chosen letter A-D: the last "Answer: X" line, else the last ``\\boxed{X}``."""
    found = re.findall(r"(?i)answer\s*(?:is)?\s*[:：]?\s*\**\s*\$?\(?\\?(?:text\{|textbf\{)?([A-D])\b", text)
    if found:
        return found[-1].upper()
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(r"\s*(?:\\text\{)?\(?([A-Da-d])\)?\}?\s*", boxed)
        if m:
            return m.group(1).upper()
    return None


def _as_float(s: str) -> float | None:
    s = s.replace(",", "").replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").strip()
    m = re.fullmatch(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            return float(m.group(1)) / float(m.group(2))
        return float(s)
    except (ValueError, ZeroDivisionError):
        num = last_number(s)  # "18 dollars", "\text{18 eggs}"
        return float(num) if num is not None and s.count(num) == 1 and len(_NUMBER.findall(s)) == 1 else None


def numbers_equal(pred: str, gold: str, rel_tol: float = 1e-6) -> bool:
    a, b = _as_float(pred), _as_float(gold)
    return a is not None and b is not None and abs(a - b) <= rel_tol * max(1.0, abs(b))


def math_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (gold first, as math-verify requires)."""
    from math_verify import parse, verify

    gold_p, pred_p = parse("\\boxed{" + gold + "}"), parse("\\boxed{" + pred + "}")
    if not gold_p or not pred_p:
        return pred.strip() == gold.strip()
    return bool(verify(gold_p, pred_p))


def grade(problem: Problem, response: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for one response."""
    pred = extract_answer(response, problem.kind)
    if pred is None:
        return None, False
    if problem.kind == "choice":
        return pred, pred == problem.answer.strip().upper()
    if problem.kind == "number":
        return pred, numbers_equal(pred, problem.answer) or math_equal(pred, problem.answer)
    return pred, math_equal(pred, problem.answer)
