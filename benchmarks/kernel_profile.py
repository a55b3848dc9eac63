"""Run a few kernel configurations back to back for Nsight Compute (ncu) to profile.

ncu --clock-control none -k regex:nvfp4_gemv python benchmarks/kernel_profile.py
"""

import torch

from fp4reason.formats import quantize_nvfp4
from fp4reason.kernels import cuda as fk
from fp4reason.kernels import prepare_nvfp4

CONFIGS = [(24576, 4096, 1, 2, 1), (24576, 4096, 1, 0, 2), (24576, 4096, 16, 0, 1), (4096, 4096, 1, 0, 16)]

for n, k, m, variant, splits in CONFIGS:
    w = prepare_nvfp4(quantize_nvfp4(torch.randn(n, k, device="cuda") * 0.02))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fk._variant = variant
    for _ in range(2):
        fk.nvfp4_linear_cuda(x, w, splits=splits)
    torch.cuda.synchronize()
    print(f"N={n} K={k} M={m} variant={variant} splits={splits}", flush=True)
