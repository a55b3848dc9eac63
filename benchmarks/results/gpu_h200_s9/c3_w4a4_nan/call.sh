#!/usr/bin/env bash
# session 9 call 3: where W4A4's NaN logits come from (eager op-by-op check, graph runs under A/B switches,
# concurrently), GPU sampling/engine tests, then e2e
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
R=$OUT/r; mkdir -p $R
python3 -c "from fp4reason.kernels.cuda import build_library; build_library()"  # build once before the parallel runs
dc() { local n=$1; shift; timeout 240 env "$@" python3 benchmarks/decode_check.py --variant nvfp4-w4a4 --steps 128 > $R/dc_$n.log 2>&1; echo "$n exit=$?" >> $R/dc_exit.txt; }
echo "=== checks $(date +%T)"
dc eager A=1 --eager &
dc graph A=1 &
dc nopdl FP4REASON_PDL=0 FP4REASON_PDL_OPS=0 FP4REASON_PDL_INDUCTOR=0 &
dc noattnquant FP4REASON_ATTN_QUANT=0 &
dc nocombine FP4REASON_ATTN_COMBINE=0 &
wait
cat $R/dc_exit.txt; grep -h "FIRST BAD\|decoded\|prefill logits" $R/dc_*.log
echo "=== tests $(date +%T)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_sampling_triton.py > $R/tests_sampling.log 2>&1; echo "exit=$?"; tail -2 $R/tests_sampling.log
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_triton.py -m "gpu or slow" > $R/tests_engine.log 2>&1; echo "exit=$?"; tail -2 $R/tests_engine.log
echo "=== e2e $(date +%T)"
timeout 280 python3 benchmarks/e2e_bench.py --variants bf16,nvfp4-w4a16,nvfp4-w4a4 --new-tokens 1024 --long-len 0 --no-compare-attn --hf-tokens 8 --out $R/e2e.json > $R/e2e.log 2>&1; echo "exit=$?"
grep -v "Assertion\|^frame" $R/e2e.log | grep "ms/step\|Error\|error" | head -30
tar -czf $OUT/r.tgz -C $OUT r
echo "=== done $(date +%T)"
