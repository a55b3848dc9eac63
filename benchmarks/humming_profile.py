"""Run humming's NVFP4 kernel on a few Llama-3.1-8B linears so Nsight Compute can profile the peer
(only the calls between cudaProfilerStart/Stop; weight preparation is not profiled):

cd benchmarks && ncu --profile-from-start off --clock-control none --section LaunchStats \
    --section SpeedOfLight --section Occupancy python humming_profile.py

Each line of CONFIGS is (N, K, M). Needs ``humming-kernels`` (the wheel in .whl/, see kernel_bench.py).
"""

import torch
from kernel_bench import humming_layers  # benchmarks/ is the working directory

from fp4reason.formats import quantize_nvfp4

CONFIGS = [(28672, 4096, 1), (28672, 4096, 16), (4096, 14336, 1), (4096, 14336, 16), (4096, 4096, 16)]

runs = []
for n, k, m in CONFIGS:
    (layer,) = humming_layers(quantize_nvfp4(torch.randn(n, k, device="cuda") * 0.02), 1)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    layer(x)  # first call: any compilation / tuning happens outside the profiled range
    runs.append((layer, x, f"N={n} K={k} M={m}"))
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for layer, x, name in runs:
    layer(x)
    torch.cuda.synchronize()
    print(name, flush=True)
torch.cuda.cudart().cudaProfilerStop()
