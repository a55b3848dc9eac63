#!/usr/bin/env bash
# session 9 call 5: the PDL activation-load fix: the new test on the HEAD build (expected to fail) and on the
# fix, kernel tests, the W4A4 decode check, kernel bench (fix vs HEAD), W4A4/W4A16 e2e quick
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
B=$PWD/.carry/base
PYTHONPATH=$PWD python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())" > $R/build_fix.log 2>&1 &
(cd $B && PYTHONPATH=$B python3 -c "from fp4reason.kernels.cuda import build_library; print(build_library())") > $R/build_base.log 2>&1 &
wait; echo "=== built $(date +%T)"
(cd $B && PYTHONPATH=$B timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k pdl_wait > $R/base_pdl_test.log 2>&1) &
PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu -k "pdl_wait or every_variant or any_grid or graph or compile" > $R/fix_kernel_tests.log 2>&1 &
PYTHONPATH=$PWD timeout 120 python3 benchmarks/decode_check.py --variant nvfp4-w4a4 --steps 64 > $R/dc_fix.log 2>&1 &
wait; echo "=== checked $(date +%T)"
tail -3 $R/base_pdl_test.log; tail -2 $R/fix_kernel_tests.log; grep -h "FIRST BAD\|decoded" $R/dc_fix.log
PYTHONPATH=$PWD:/tmp/site timeout 40 python3 benchmarks/kernel_bench.py --m 1,4,8,16 --only-ours --out $R/kb_fix > $R/kb_fix.log 2>&1
(cd $B && PYTHONPATH=$B:/tmp/site timeout 40 python3 benchmarks/kernel_bench.py --m 1,4,8,16 --only-ours --out $R/kb_base > $R/kb_base.log 2>&1)
grep "^| Llama-3.1-8B | [0-9]\|^| Qwen3-8B | [0-9]" $R/kb_fix/kernel_bench.md $R/kb_base/kernel_bench.md
echo "=== e2e $(date +%T)"
PYTHONPATH=$PWD timeout 75 python3 benchmarks/e2e_bench.py --variants nvfp4-w4a4 --batches 1,8 --new-tokens 256 --long-len 0 --no-compare-attn --out $R/e2e_w4a4.json > $R/e2e_w4a4.log 2>&1; echo "exit=$?"
grep "ms/step\|Error" $R/e2e_w4a4.log | head
tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
