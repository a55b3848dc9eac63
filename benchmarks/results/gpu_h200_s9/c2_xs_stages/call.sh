#!/usr/bin/env bash
# session 9 call 2: kernel tests, XS variants 4 (shrunk ring) / 10 / 11 vs the HEAD build, e2e A/B
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
t() { local n=$1 s=$2; shift 2; echo "=== $n $(date +%T)"; timeout "$s" "$@" > "$OUT/$n.log" 2>&1; echo "exit=$?"; tail -n 4 "$OUT/$n.log"; }
t kernel_tests 200 python3 -m pytest -q -m "gpu or slow" -p no:cacheprovider tests/test_kernels.py
for v in 4 10 11; do
  ms=1,4,8,16; [ $v = 11 ] && ms=1,4
  t kb_xs$v 120 env FP4REASON_XS_VARIANT=$v python3 benchmarks/kernel_bench.py --m $ms --only-ours --out /tmp/kb$v
  cp /tmp/kb$v/kernel_bench.md "$OUT/kb_xs$v.md"
done
( cd .carry/base && PYTHONPATH=$PWD:/tmp/site timeout 120 python3 benchmarks/kernel_bench.py --m 1,4,8,16 --only-ours --out /tmp/kbb > "$OUT/kb_base.log" 2>&1; cp /tmp/kbb/kernel_bench.md "$OUT/kb_base.md" )
echo "=== base done $(date +%T)"
for v in 4 10; do
  t e2e_xs$v 150 env FP4REASON_XS_VARIANT=$v python3 benchmarks/e2e_bench.py --variants nvfp4-w4a16,nvfp4-w4a4 --batches 1,8 --new-tokens 256 --long-len 0 --no-compare-attn --out "$OUT/e2e_xs$v.json"
done
echo "=== done $(date +%T)"
