#!/usr/bin/env bash
# session 11 call 2: the sort-free top-p sampler (fp4reason/sampling/nucleus.py) on the GPU: tests, profile,
# sampler_overhead, e2e with the sampler line
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())" > $R/build.log 2>&1 &
echo "=== sampler tests $(date +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_sampling_nucleus.py tests/test_sampling_triton.py tests/test_sampling.py > $R/sampler_tests.log 2>&1; echo "exit=$?"; tail -4 $R/sampler_tests.log
echo "=== sampler profile $(date +%T)"
timeout 90 python3 .carry/prof_sampler.py > $R/sampler_profile.log 2>&1; echo "exit=$?"; grep "graph replay" $R/sampler_profile.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== sampler overhead $(date +%T)"
timeout 120 python3 benchmarks/sampler_overhead.py --device cuda --out $R/sampler_overhead_gpu.json > $R/sampler_overhead.log 2>&1; echo "exit=$?"; grep -v Warn $R/sampler_overhead.log | tail -9
tar -czf $OUT/r.tgz -C $OUT r
wait; tail -1 $R/build.log
echo "=== engine gpu tests $(date +%T)"
timeout 150 python3 -m pytest -q -m "gpu or slow" -p no:cacheprovider -p no:logging tests/test_engine.py tests/test_sampling.py tests/test_sampling_triton.py > $R/engine_tests.log 2>&1; echo "exit=$?"; tail -4 $R/engine_tests.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== e2e $(date +%T)"
timeout 150 python3 benchmarks/e2e_bench.py --variants bf16,nvfp4-w4a16 --batches 1,8 --new-tokens 256 --long-len 0 --no-compare-attn --hf-tokens 0 --out $R/e2e_short.json > $R/e2e_short.log 2>&1; echo "exit=$?"; grep "ms/step\|sampler" $R/e2e_short.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
