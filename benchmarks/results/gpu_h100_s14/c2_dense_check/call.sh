#!/usr/bin/env bash
# The one GPU call that validates and times the dense BF16 small-M kernel (benchmarks/NOTES.md v17): build,
# dense GPU tests, e2e BF16 A/B (FP4REASON_DENSE_GEMV=0/1) with W4A16 in the same run, dense kernel bench vs
# cuBLAS, engine GPU tests (in that order, so a short lease still answers the first questions). The 80 NVFP4
# kernels compile to the same SASS as session 11's GPU-tested build (benchmarks/sass_diff.py, NOTES.md v17).
# From the repository root on the GPU host: OUT=<dir> bash benchmarks/gpu_dense_check.sh
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
echo "=== build $(date +%T)"
python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())" > $R/build.log 2>&1; tail -2 $R/build.log
echo "=== dense tests $(date +%T)"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dense_kernel.py > $R/dense_tests.log 2>&1; echo "exit=$?"; grep -E "passed|failed|Error|assert" $R/dense_tests.log | head -20
tar -czf $OUT/r.tgz -C $OUT r
for D in 1 0; do
V=bf16; [ $D = 1 ] && V=bf16,nvfp4-w4a16
echo "=== e2e $V DENSE_GEMV=$D $(date +%T)"
FP4REASON_DENSE_GEMV=$D timeout 150 python3 benchmarks/e2e_bench.py --variants $V --new-tokens 1024 --long-len 0 --no-compare-attn --hf-tokens 0 --out $R/e2e_dense$D.json > $R/e2e_dense$D.log 2>&1; echo "exit=$?"; grep "ms/step\|kernels\|speed-up\|^ *[0-9]* |" $R/e2e_dense$D.log
tar -czf $OUT/r.tgz -C $OUT r
done
echo "=== dense bench $(date +%T)"
timeout 150 python3 benchmarks/kernel_bench.py --dense --out $R/kernel > $R/kernel_dense.log 2>&1; echo "exit=$?"; grep -A12 "Per layer" $R/kernel_dense.log; tail -3 $R/kernel_dense.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== engine gpu tests $(date +%T)"
timeout 130 python3 -m pytest -q -m "gpu or slow" -p no:cacheprovider -p no:logging tests/test_engine.py > $R/engine_tests.log 2>&1; echo "exit=$?"; tail -2 $R/engine_tests.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
