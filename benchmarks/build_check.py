"""Build (or take the cached) NVFP4 kernel library and check that it runs here: one M = 1 launch against the
dequantized reference. A library built elsewhere and carried in (``FP4REASON_CACHE``) may load and still not
run on this host; ``run_gpu.sh``'s build stage then rebuilds it with ``--force`` in a fresh process (a rebuilt
library has the same path, which the loader of this process would not open again).

    python benchmarks/build_check.py [--force]
"""

import argparse
import sys

import torch

from fp4reason.formats import quantize_nvfp4
from fp4reason.kernels import cuda


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    args = ap.parse_args()
    path = cuda.build_library(force=args.force)
    torch.manual_seed(0)
    w = quantize_nvfp4(torch.randn(256, 512, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    y = cuda.nvfp4_linear_cuda(x, w).float()
    ref = x.float() @ w.dequantize().float().T
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    print(f"{path}: one launch, largest error {err:.2e} of the largest output")
    return 0 if err <= 2e-2 else 1  # NaN fails too


if __name__ == "__main__":
    sys.exit(main())
