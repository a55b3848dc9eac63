"""The main job end to end on a tiny model directory: both answers, the quantization and the summary."""

import re

from test_eval import byte_tokenizer, tiny_lm

from fp4reason.cli import main


def test_demo_runs_bf16_then_nvfp4_with_reset(tmp_path, capsys):
    model = tiny_lm("llama")
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    assert main(["demo", "--model", str(tmp_path), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "[3/4] quantizing to nvfp4-w4a4" in out
    assert "answer with ReSET (t_low=0.1" in out  # no preset for this model: ReSET defaults
    stats = re.findall(r"tokens=\s*(\d+)\s+mean H=([\d.]+) nats", out)
    assert [int(n) for n, _ in stats] == [6, 6]  # eos disabled in the tiny model: both hit the budget
    assert all(float(h) > 0 for _, h in stats)
    assert re.search(r"tokens at T_low: \d+%", out)
