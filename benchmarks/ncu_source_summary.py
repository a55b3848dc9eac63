"""Summarise an Nsight Compute source-page export: per kernel, the warp-stall mix and the SASS lines with
the most stall samples.

    ncu --clock-control none -k regex:nvfp4_gemv --launch-count 2 --section SourceCounters \
        --section WarpStateStats -o src python benchmarks/kernel_profile.py
    ncu -i src.ncu-rep --page source --csv --print-source sass > src.csv
    python benchmarks/ncu_source_summary.py src.csv [--top 12]
"""

import argparse
import csv
from collections import Counter


def kernels(path: str) -> list[dict]:
    """[{name, rows: [{column: value}]}] from the CSV (one block per profiled kernel)."""
    out, header = [], None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                out.append({"name": row[1], "rows": []})
            elif row[0] == "Address":
                header = row
            elif out and header:
                out[-1]["rows"].append(dict(zip(header, row, strict=False)))
    seen, unique = set(), []  # the export repeats each kernel's block
    for k in out:
        key = (k["name"], len(k["rows"]), tuple(r.get("Address") for r in k["rows"][:3]))
        if key not in seen:
            seen.add(key)
            unique.append(k)
    return unique


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    for k in kernels(args.csv):
        rows = k["rows"]
        stalls = [c for c in rows[0] if c.startswith("stall_") and "(Not" not in c] if rows else []

        def num(r, c):
            return int(r.get(c) or 0)

        total = sum(num(r, "Warp Stall Sampling (All Samples)") for r in rows)
        mix = Counter({c: sum(num(r, c) for r in rows) for c in stalls})
        print(f"## {k['name'][:160]}\n")
        shares = ", ".join(f"{c[6:]} {v / total:.1%}" for c, v in mix.most_common(8))
        print(f"{total} stall samples; {shares}")
        print("\n| samples | share | top stalls | SASS |\n|---|---|---|---|")
        rows.sort(key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))
        for r in rows[: args.top]:
            s = num(r, "Warp Stall Sampling (All Samples)")
            top = sorted(((num(r, c), c[6:]) for c in stalls), reverse=True)[:2]
            why = ", ".join(f"{c} {v}" for v, c in top if v)
            print(f"| {s} | {s / total:.1%} | {why} | `{r.get('Source', '').strip()}` |")
        print()


if __name__ == "__main__":
    main()
