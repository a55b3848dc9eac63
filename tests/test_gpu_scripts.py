"""Preflight for the GPU-host drivers: a device call is scarce, so a flag a script does not take, a pytest
selection that selects nothing, or a shell syntax error must fail here, on the CPU, not there."""

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = sorted((ROOT / "benchmarks").glob("*.sh"))


def _commands(script: Path) -> list[str]:
    """The driver's lines with backslash continuations joined."""
    return script.read_text().replace("\\\n", " ").splitlines()


def _script_flags(script: Path) -> set[str]:
    """Every ``--flag`` the script's argparse parser takes (read from its source, nothing imported)."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            consts = [a.value for a in node.args if isinstance(a, ast.Constant)]
            names = {c for c in consts if str(c).startswith("--")}
            flags |= names
            if any(getattr(k.value, "attr", "") == "BooleanOptionalAction" for k in node.keywords):
                flags |= {"--no-" + n[2:] for n in names}
    return flags | {"--help"}


def _script_calls() -> list[tuple[str, str, str]]:
    """(driver, benchmark script, the flags text after it) for every ``benchmarks/X.py`` a driver runs."""
    calls = []
    for driver in DRIVERS:
        for line in _commands(driver):
            for m in re.finditer(r"benchmarks/(\w+)\.py([^;|&>]*)", line):
                calls.append((driver.name, m.group(1), m.group(2)))
    return calls


def _pytest_calls() -> list[tuple[str, list[str]]]:
    """(driver, pytest arguments) for every ``python3 -m pytest`` a driver runs."""
    calls = []
    for driver in DRIVERS:
        for line in _commands(driver):
            for m in re.finditer(r"-m pytest ([^;|&>]*)", line):
                calls.append((driver.name, shlex.split(m.group(1))))
    return calls


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda p: p.name)
def test_driver_is_valid_bash(driver):
    subprocess.run(["bash", "-n", str(driver)], check=True)


def test_run_gpu_sh_calls_are_found():
    scripts = {s for d, s, _ in _script_calls() if d == "run_gpu.sh"}
    assert {"kernel_bench", "e2e_bench", "attn_bench", "step_profile", "decode_check"} <= scripts
    assert len([c for c in _pytest_calls() if c[0] == "run_gpu.sh"]) >= 5


CALLS = _script_calls()


@pytest.mark.parametrize("driver,script,args", CALLS, ids=[f"{d}-{s}" for d, s, _ in CALLS])
def test_driver_flags_exist(driver, script, args):
    path = ROOT / "benchmarks" / f"{script}.py"
    assert path.exists(), f"{driver} runs benchmarks/{script}.py, which does not exist"
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", args))
    unknown = used - _script_flags(path)
    assert not unknown, f"{driver} passes {sorted(unknown)} to {script}.py, which takes none of them"


def test_flag_parser_sees_a_missing_flag(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import argparse\nap = argparse.ArgumentParser()\nap.add_argument('--out')\n"
        "ap.add_argument('--graph', action=argparse.BooleanOptionalAction)\n"
    )
    assert _script_flags(script) == {"--out", "--graph", "--no-graph", "--help"}


@pytest.mark.parametrize("driver,args", _pytest_calls(), ids=[d for d, _ in _pytest_calls()])
def test_driver_pytest_selection_is_not_empty(driver, args):
    keep, skip_next = [], False
    for a in args:  # plugins and output options do not change what is selected
        if skip_next:
            skip_next = False
        elif a == "-p":
            skip_next = True
        elif a != "-q":
            keep.append(a)
    for a in keep:
        if a.startswith("tests/"):
            assert (ROOT / a).exists(), f"{driver}: {a} does not exist"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *keep],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", r.stdout)
    selected = int(m.group(1)) if r.returncode == 0 and m else 0
    assert selected > 0, f"{driver}: pytest {' '.join(keep)} selects nothing:\n{r.stdout[-2000:]}"


def test_driver_env_settings_are_read_somewhere():
    """An A/B setting the code never reads would time the same build twice."""
    source = "".join(p.read_text() for p in (ROOT / "fp4reason").rglob("*.py"))
    source += "".join(p.read_text() for p in (ROOT / "benchmarks").glob("*.py"))
    for driver in DRIVERS:
        for name in set(re.findall(r"FP4REASON_[A-Z0-9_]+", driver.read_text())):
            assert f'"{name}"' in source, f"{driver.name} sets {name}, which nothing reads"


def _ab_json(path: Path, rows: dict[str, list[tuple[int, float]]]) -> Path:
    runs = {v: [{"batch": b, "ms_per_step": ms} for b, ms in cells] for v, cells in rows.items()}
    path.write_text(json.dumps({"runs": runs}))
    return path


def test_ab_summary_medians_rounds_and_change(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ab_summary
    finally:
        sys.path.pop(0)
    w = "nvfp4-w4a16"
    files = [  # two rounds of a baseline and one setting, as run_gpu.sh names them
        _ab_json(tmp_path / "e2e_ab_FP4REASON_XF_0_r1.json", {w: [(1, 3.0), (8, 4.0)]}),
        _ab_json(tmp_path / "e2e_ab_FP4REASON_XF_16_r1.json", {w: [(1, 2.7), (8, 4.2)]}),
        _ab_json(tmp_path / "e2e_ab_FP4REASON_XF_0_r2.json", {w: [(1, 3.2), (8, 4.0)]}),
        _ab_json(tmp_path / "e2e_ab_FP4REASON_XF_16_r2.json", {w: [(1, 2.9), (8, 4.2)]}),
    ]
    table = ab_summary.collect(files)
    assert list(table) == ["FP4REASON_XF_0", "FP4REASON_XF_16"]
    assert table["FP4REASON_XF_16"][(w, 1)] == [2.7, 2.9]
    rows = ab_summary.render(table).splitlines()
    # batch 1: medians 3.1 and 2.8 -> 2.8 / 3.1 - 1 = -9.7 %; batch 8: 4.2 / 4.0 - 1 = +5.0 %
    assert "| FP4REASON_XF_16 | nvfp4-w4a16 | 1 | 2.800 | 2.700-2.900 | -9.7 % |" in rows
    assert "| FP4REASON_XF_16 | nvfp4-w4a16 | 8 | 4.200 | 4.200-4.200 | +5.0 % |" in rows
    assert "| FP4REASON_XF_0 | nvfp4-w4a16 | 1 | 3.100 | 3.000-3.200 | +0.0 % |" in rows
    with pytest.raises(ValueError, match="no A/B results"):
        ab_summary.render({})
