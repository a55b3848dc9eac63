"""`fp4reason qfit` then `fp4reason train --qat --sem` end to end on a tiny model dir; the QAT benchmark."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_qfit_then_qat_sem_cli(model_dir, tmp_path):
    from fp4reason.cli import main

    traces = tmp_path / "traces.jsonl"
    traces.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}."}) + "\n"
            for i in range(8)
        )
    )
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    qdir = tmp_path / "qfit"
    assert (
        main(
            [
                "qfit",
                "--model",
                str(model_dir),
                "--out",
                str(qdir),
                "--calib-file",
                str(calib),
                "--samples",
                "2",
                "--seq-len",
                "64",
                "--grid",
                "3",
            ]
        )
        == 0
    )
    assert (qdir / "k_shift.safetensors").is_file() and (qdir / "config.json").is_file()
    run = tmp_path / "run"
    args = [
        "train",
        "--model",
        str(qdir),
        "--traces",
        str(traces),
        "--out",
        str(run),
        "--qat",
        "--sem",
        "0.1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--mixed-precision",
        "no",
        "--lr",
        "1e-3",
    ]
    assert main(args + ["--stop-after", "2"]) == 0
    assert not (run / "final").exists()
    assert main(args) == 0  # resumes and finishes
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["sem"] > 0 for r in log)
    assert (run / "final" / "k_shift.safetensors").is_file() and (run / "final" / "tokenizer.json").is_file()
    assert (
        main(
            [
                "train",
                "--model",
                str(qdir),
                "--traces",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 2
    )


def test_qat_throughput_benchmark_tiny(tmp_path):
    out = tmp_path / "qat.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "qat_throughput.py"),
            "--tiny",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--modes",
            "bf16,qat_sem",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"bf16", "qat_sem"} and doc["results"]["bf16"]["ratio_vs_bf16"] == 1.0
    assert doc["results"]["qat_sem"]["tokens_per_s"] > 0 and "x BF16 step" in r.stdout


def test_teacher_traces_then_train(model_dir, tmp_path):
    from fp4reason.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}.", "id": i}) + "\n" for i in range(4)))
    traces = tmp_path / "traces.jsonl"
    args = [
        "train",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--traces",
        str(traces),
        "--out",
        str(tmp_path / "run"),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--mixed-precision",
        "no",
    ]
    assert main(args) == 0
    recs = [json.loads(line) for line in traces.read_text().splitlines()]
    assert [r["id"] for r in recs] == [0, 1, 2, 3] and all(r["completion"] for r in recs)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2
