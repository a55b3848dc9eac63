"""Which kernels of ``csrc/nvfp4_gemv.cu`` compile to other SASS than at an earlier commit (no GPU needed).

A source change meant for some instantiations (a new template parameter, say) should leave the others'
machine code alone; when it does, their earlier GPU tests and timings still describe them. Both sources are
compiled for sm_90 with ``nvcc -cubin`` and disassembled with nvdisasm (the test extra's
``nvidia-cuda-nvdisasm``); labels, the anonymous-namespace hash and the self-references in returns are renamed
before the comparison, and a kernel's name is matched with ``--extra-param`` appended to its old template
arguments (for a parameter added at the end; kernel parameters appended at the end change only the name's
tail, which the match ignores)::

    python benchmarks/sass_diff.py b933235^ --extra-param Li0E
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from fp4reason.kernels.cuda import _nvcc, nvdisasm

ROOT = Path(__file__).resolve().parents[1]
SRC = Path("fp4reason/kernels/csrc/nvfp4_gemv.cu")  # in this checkout, and at the earlier commit


def kernels(src: Path, tmp: Path) -> dict[str, list[str]]:
    """Kernel name (namespace hash removed) -> its normalized SASS lines."""
    cubin = tmp / (src.stem + ".cubin")
    subprocess.run(
        [_nvcc(), "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(cubin), str(src)],
        check=True,
        capture_output=True,
    )
    sass = subprocess.run([nvdisasm(), str(cubin)], check=True, capture_output=True, text=True).stdout
    out: dict[str, list[str]] = {}
    name = None
    for line in sass.splitlines():
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            name = re.sub(r"_ZN\d+_GLOBAL__N__\w+?(\d+nvfp4)", r"\1", m.group(1))
            out[name] = []
            continue
        m = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if name and m:
            ins = re.sub(r"\s+", " ", re.sub(r"__internal_\d+_", "__internal_", m.group(1).strip()))
            out[name].append(re.sub(r"\(_ZN\S+\)", "(self)", re.sub(r"\.L_x_\d+", "L", ins)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the earlier commit (git rev)")
    ap.add_argument("--extra-param", default="", help="mangled template argument the current source appends")
    args = ap.parse_args()
    if nvdisasm() is None:
        sys.exit("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old_src = tmp / "old_nvfp4_gemv.cu"
        old_src.write_bytes(
            subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{args.rev}:{SRC}"], check=True, capture_output=True
            ).stdout
        )
        old, new = kernels(old_src, tmp), kernels(ROOT / SRC, tmp)
    # matched on the template arguments only: parameters appended to the kernel change the mangled name's tail
    new = {name.split("EEv", 1)[0]: sass for name, sass in new.items()}
    same, changed, gone = 0, [], []
    for name, sass in old.items():
        now = new.get(name.split("EEv", 1)[0] + args.extra_param)
        if now is None:
            gone.append(name)
        elif now == sass:
            same += 1
        else:
            changed.append(name)
    print(f"{len(old)} kernels at {args.rev}, {len(new)} now: {same} identical,", end=" ")
    print(f"{len(changed)} changed, {len(gone)} not found")
    for name in changed + gone:
        print(("changed   " if name in changed else "not found ") + name)
    return 0 if not changed and not gone else 1


if __name__ == "__main__":
    sys.exit(main())
