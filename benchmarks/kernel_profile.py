"""Run a few kernel configurations back to back for Nsight Compute (ncu) to profile.

ncu --clock-control none -k regex:nvfp4_gemv --section SpeedOfLight --section WarpStateStats \
    python benchmarks/kernel_profile.py

Each line of CONFIGS is (N, K, M): a Llama-3.1-8B linear with the shipped dispatch (variant, grid).
"""

import torch

from fp4reason.formats import quantize_nvfp4
from fp4reason.kernels import cuda as fk
from fp4reason.kernels import prepare_nvfp4

CONFIGS = [(n, k, m) for m in (1, 16) for n, k in ((28672, 4096), (4096, 14336), (4096, 4096))]

for n, k, m in CONFIGS:
    w = prepare_nvfp4(quantize_nvfp4(torch.randn(n, k, device="cuda") * 0.02))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fk.nvfp4_linear_cuda(x, w)
    torch.cuda.synchronize()
    print(f"N={n} K={k} M={m} variant={fk.variant_for(m, n)} ctas={fk.grid_ctas(m, n, k)}", flush=True)
