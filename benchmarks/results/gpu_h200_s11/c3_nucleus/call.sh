#!/usr/bin/env bash
# session 11 call 3: the sort-free top-p sampler after the spill fix (16 scalar sums instead of a [BLOCK, 16]
# one-hot; IEEE divisions): GPU tests, profile, sampler_overhead, short e2e with the sampler lines at b1 / b8
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())" > $R/build.log 2>&1 &
echo "=== sampler tests $(date +%T)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_sampling_nucleus.py tests/test_sampling_triton.py > $R/sampler_tests.log 2>&1; echo "exit=$?"; tail -4 $R/sampler_tests.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== sampler profile $(date +%T)"
timeout 80 python3 .carry/prof_sampler.py > $R/sampler_profile.log 2>&1; echo "exit=$?"; grep "graph replay" $R/sampler_profile.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== sampler overhead $(date +%T)"
timeout 100 python3 benchmarks/sampler_overhead.py --device cuda --compile-batches --out $R/sampler_overhead_gpu.json > $R/sampler_overhead.log 2>&1; echo "exit=$?"; grep -v Warn $R/sampler_overhead.log | tail -9
tar -czf $OUT/r.tgz -C $OUT r
wait; tail -1 $R/build.log
echo "=== e2e $(date +%T)"
timeout 170 python3 benchmarks/e2e_bench.py --variants bf16,nvfp4-w4a16 --batches 1,8 --new-tokens 256 --long-len 0 --no-compare-attn --hf-tokens 0 --out $R/e2e_short.json > $R/e2e_short.log 2>&1; echo "exit=$?"; grep "ms/step\|sampler" $R/e2e_short.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
