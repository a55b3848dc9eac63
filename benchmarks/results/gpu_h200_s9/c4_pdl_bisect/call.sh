#!/usr/bin/env bash
# session 9 call 4: bisect W4A4's NaN under PDL (two waves of four concurrent decode checks, 36 layers)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
R=$OUT/r; mkdir -p $R
python3 -c "from fp4reason.kernels.cuda import build_library; build_library()"
dc() { local n=$1; shift; local a=(); while [ $# -gt 0 ] && [ "$1" != -- ]; do a+=("$1"); shift; done; shift
  timeout 200 env "${a[@]}" python3 benchmarks/decode_check.py --variant nvfp4-w4a4 --steps 32 "$@" > $R/dc_$n.log 2>&1; echo "$n exit=$?" >> $R/dc_exit.txt; }
echo "=== wave 1 $(date +%T)"
dc gemv_pdl0 FP4REASON_PDL=0 -- &
dc ops_pdl0 FP4REASON_PDL_OPS=0 -- &
dc inductor_pdl0 FP4REASON_PDL_INDUCTOR=0 -- &
dc eager A=1 -- --eager &
wait
echo "=== wave 2 $(date +%T)"
dc gated0 FP4REASON_GATED_MLP=0 -- &
dc variant4 FP4REASON_VARIANT=4 -- &
dc b8 A=1 -- --batch 8 &
dc control A=1 -- &
wait
cat $R/dc_exit.txt; for f in $R/dc_*.log; do echo "--- $f"; grep -h "FIRST BAD\|decoded\|Error" $f | head -3; done
echo "=== done $(date +%T)"
