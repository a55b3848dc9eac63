#!/usr/bin/env bash
# session 11 call 1: re-measure the shipped kernel (kernel bench with humming, full e2e) + sampler breakdown
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
echo "=== build $(date +%T)"
python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())" > $R/build.log 2>&1; tail -1 $R/build.log
echo "=== sampler profile $(date +%T)"
timeout 120 python3 .carry/prof_sampler.py > $R/sampler_profile.log 2>&1; echo "exit=$?"; grep "graph replay" $R/sampler_profile.log; tar -czf $OUT/r.tgz -C $OUT r
echo "=== kernel $(date +%T)"
timeout 150 python3 benchmarks/kernel_bench.py --m 1,2,4,8,16 --out $R/kernel > $R/kernel_bench.log 2>&1; echo "exit=$?"; tail -30 $R/kernel_bench.log; tar -czf $OUT/r.tgz -C $OUT r
echo "=== e2e $(date +%T)"
timeout 300 python3 benchmarks/e2e_bench.py --new-tokens 1024 --out $R/e2e.json > $R/e2e.log 2>&1; echo "exit=$?"; grep -v "^ *[0-9]*%" $R/e2e.log | tail -40
tar -czf $OUT/r.tgz -C $OUT r
echo "=== sampler overhead $(date +%T)"
timeout 90 python3 benchmarks/sampler_overhead.py --device cuda --out $R/sampler_overhead_gpu.json > $R/sampler_overhead.log 2>&1; echo "exit=$?"; tail -25 $R/sampler_overhead.log; tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
