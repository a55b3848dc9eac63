#!/usr/bin/env bash
# session 10 call 2: the distributed add + RMSNorm epilogue: its tests, decode checks, e2e A/B, GPU tests
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
echo "=== build $(date +%T)"
PYTHONPATH=$PWD python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())" > $R/build.log 2>&1
tail -2 $R/build.log
PYTHONPATH=$PWD timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k add_rms_norm > $R/add_norm_tests.log 2>&1; echo "exit=$?"
tail -3 $R/add_norm_tests.log
echo "=== checks $(date +%T)"
PYTHONPATH=$PWD timeout 100 python3 benchmarks/decode_check.py --variant nvfp4-w4a4 --steps 64 > $R/dc_w4a4.log 2>&1 &
PYTHONPATH=$PWD timeout 100 python3 benchmarks/decode_check.py --variant nvfp4-w4a16 --steps 64 > $R/dc_w4a16.log 2>&1 &
PYTHONPATH=$PWD timeout 100 python3 benchmarks/decode_check.py --variant nvfp4-w4a4 --batch 8 --steps 64 > $R/dc_w4a4_b8.log 2>&1 &
wait
grep -h "FIRST BAD\|decoded\|Error" $R/dc_*.log
echo "=== ab $(date +%T)"
for setting in FP4REASON_ADD_NORM=1 FP4REASON_ADD_NORM=0; do
  n=${setting//[^A-Za-z0-9]/_}
  env $setting PYTHONPATH=$PWD timeout 120 python3 benchmarks/e2e_bench.py --variants nvfp4-w4a16,nvfp4-w4a4 --batches 1,4,8 \
    --new-tokens 256 --long-len 0 --no-compare-attn --hf-tokens 0 --out $R/ab_$n.json > $R/ab_$n.log 2>&1; echo "$n exit=$?"
  grep "ms/step" $R/ab_$n.log | grep -v sampler
done
echo "=== tests $(date +%T)"
PYTHONPATH=$PWD:/tmp/site timeout 200 python3 -m pytest -q -m "gpu or slow" -p no:cacheprovider -p no:logging \
  tests/test_kernels.py tests/test_engine.py tests/test_engine_triton.py > $R/gpu_tests.log 2>&1; echo "exit=$?"
tail -4 $R/gpu_tests.log
tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
