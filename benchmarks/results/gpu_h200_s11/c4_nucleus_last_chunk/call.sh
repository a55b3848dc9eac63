#!/usr/bin/env bash
# session 11 call 4: nucleus v2 (the row's last chunk merges; [16, BLOCK] bins; 75 x 2048 chunks): GPU tests,
# profile, sampler_overhead, short e2e sampler lines, then the engine's GPU tests
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())" > $R/build.log 2>&1 &
echo "=== sampler tests $(date +%T)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_sampling_nucleus.py tests/test_sampling_triton.py > $R/sampler_tests.log 2>&1; echo "exit=$?"; tail -3 $R/sampler_tests.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== sampler profile $(date +%T)"
timeout 60 python3 benchmarks/sampler_profile.py > $R/sampler_profile.log 2>&1; echo "exit=$?"; grep "graph replay" $R/sampler_profile.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== sampler overhead $(date +%T)"
timeout 60 python3 benchmarks/sampler_overhead.py --device cuda --compile-batches --out $R/sampler_overhead_gpu.json > $R/sampler_overhead.log 2>&1; echo "exit=$?"; grep -v Warn $R/sampler_overhead.log | tail -9
tar -czf $OUT/r.tgz -C $OUT r
wait; tail -1 $R/build.log
echo "=== e2e $(date +%T)"
timeout 100 python3 benchmarks/e2e_bench.py --variants nvfp4-w4a16 --batches 1,8 --new-tokens 256 --long-len 0 --no-compare-attn --hf-tokens 0 --out $R/e2e_short.json > $R/e2e_short.log 2>&1; echo "exit=$?"; grep "ms/step\|sampler" $R/e2e_short.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== engine gpu tests $(date +%T)"
timeout 130 python3 -m pytest -q -m "gpu or slow" -p no:cacheprovider -p no:logging tests/test_engine.py tests/test_sampling.py > $R/engine_tests.log 2>&1; echo "exit=$?"; tail -2 $R/engine_tests.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
