"""One table from the A/B runs of ``run_gpu.sh ab`` (``e2e_bench.py`` JSON files, one per setting and round):
ms per decode step per setting, variant and batch (the median over rounds, with the rounds' range), and the
change against the first setting given, so a call's output already says which setting won and by how much
more than the rounds differ.

    python benchmarks/ab_summary.py OUT/e2e_ab_A.json OUT/e2e_ab_B.json ... [--out OUT/ab_summary.md]
"""

import argparse
import json
import re
import statistics
from pathlib import Path


def setting_of(path: Path) -> str:
    """The setting a file was run with: its name without ``e2e_ab_`` and a ``_rN`` round suffix."""
    return re.sub(r"_r\d+$", "", path.stem.removeprefix("e2e_ab_"))


def collect(paths: list[Path]) -> dict[str, dict[tuple[str, int], list[float]]]:
    """setting -> (variant, batch) -> ms per step of each round, settings in the order first seen."""
    table: dict[str, dict[tuple[str, int], list[float]]] = {}
    for path in paths:
        runs = json.loads(path.read_text())["runs"]
        cells = table.setdefault(setting_of(path), {})
        for variant, rows in runs.items():
            for row in rows:
                cells.setdefault((variant, row["batch"]), []).append(row["ms_per_step"])
    return table


def render(table: dict[str, dict[tuple[str, int], list[float]]]) -> str:
    if not table:
        raise ValueError("no A/B results given")
    base_name = next(iter(table))
    base = table[base_name]
    lines = [
        f"| setting | variant | batch | ms / step (median) | rounds' range | vs {base_name} |",
        "|---|---|---|---|---|---|",
    ]
    for name, cells in table.items():
        for (variant, batch), values in sorted(cells.items()):
            med = statistics.median(values)
            spread = f"{min(values):.3f}-{max(values):.3f}" if len(values) > 1 else "one round"
            ref = base.get((variant, batch))
            change = f"{(med / statistics.median(ref) - 1) * 100:+.1f} %" if ref else "n/a"
            lines.append(f"| {name} | {variant} | {batch} | {med:.3f} | {spread} | {change} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="e2e_bench JSON files, the baseline setting's first")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    missing = [str(p) for p in args.files if not p.exists()]
    if missing:
        ap.error(f"no such file: {', '.join(missing)}")
    text = render(collect(args.files))
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
