#!/usr/bin/env bash
# Kernel tuning call on the GPU host: build, then the named stages (default: tests ncu sweep).
#   tests: GPU kernel tests; ncu: Nsight Compute summaries of ours per variant in NCU_VARIANTS;
#   humming: the same for the humming peer; sweep: kernel_bench with a split x variant sweep;
#   grids: kernel_bench (with the peers) timing each CTAs-per-SM grid policy in GRIDS (0 = split-K).
# Usage there: OUT=/some/dir [NCU_VARIANTS="0 4"] [SWEEP_M=1,16] [SWEEP_VARIANTS=4,8] [GRIDS=0,2,4] \
#   bash benchmarks/run_kernel_tuning.sh [tests] [ncu] [humming] [sweep] [grids]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/site
python3 -c "from fp4reason.kernels import cuda; print(cuda.build_library())" 2>&1 | tail -2
STALLS='regex:smsp__average_warps_issue_stalled_(long_scoreboard|short_scoreboard|barrier|mio_throttle|lg_throttle|math_pipe_throttle|wait|not_selected|selected|no_instruction|dispatch_stall|drain|branch_resolving|membar|sleeping|tex_throttle|imc_miss)_per_issue_active\.ratio'
SUMMARY='nvfp4_gemv_kernel|Duration|DRAM Throughput|Issued Warp|Achieved Occ|stalled|Grid Size|Block Size|Registers Per|Dynamic Shared|Waves Per SM|^  [a-zA-Z_:<>0-9]+\('
SECTIONS="--section SpeedOfLight --section SchedulerStats --section Occupancy --section LaunchStats"
for stage in ${*:-tests ncu sweep}; do
  case $stage in
    tests)
      timeout ${TEST_LIMIT:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py > $OUT/kernel_tests.txt 2>&1
      echo tests=$?; tail -3 $OUT/kernel_tests.txt ;;
    ncu)
      for v in ${NCU_VARIANTS:-0 4}; do
        FP4REASON_VARIANT=$v timeout 100 ncu --clock-control none -k regex:nvfp4_gemv $SECTIONS --metrics "$STALLS" python3 benchmarks/kernel_profile.py > $OUT/ncu_variant$v.txt 2>&1; echo ncu$v=$?
        grep -E "$SUMMARY" $OUT/ncu_variant$v.txt | sed -E 's/\(const unsigned.*\) \(/ (/; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | cut -c1-100
      done ;;
    humming)
      (cd benchmarks && timeout 120 ncu --profile-from-start off --clock-control none $SECTIONS --metrics "$STALLS" python3 humming_profile.py) > $OUT/ncu_humming.txt 2>&1; echo ncu_humming=$?
      grep -E "$SUMMARY|N=" $OUT/ncu_humming.txt | sed -E 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | cut -c1-120 | head -150 ;;
    sweep)
      timeout ${SWEEP_LIMIT:-330} python3 benchmarks/kernel_bench.py --m ${SWEEP_M:-1,2,4,8,16} --sweep --variants ${SWEEP_VARIANTS:-0,4,5} --out $OUT/kernel > $OUT/kernel_bench.log 2>&1; echo bench=$?
      grep -A12 "Per layer" $OUT/kernel_bench.log
      grep -oE "N=[0-9]+ K=[0-9]+ M=[0-9]+|ctas=[0-9]+ |ours=[0-9.]+|best=v[0-9]_s[0-9]+|best_us=[0-9.]+|humming=[0-9.]+" $OUT/kernel_bench.log | paste -d' ' - - - - - - | head -40 ;;
    grids)
      timeout ${SWEEP_LIMIT:-330} python3 benchmarks/kernel_bench.py --m ${SWEEP_M:-1,2,4,8,16} --grids ${GRIDS:-0,2,3,4,6} --out $OUT/kernel > $OUT/kernel_bench.log 2>&1; echo bench=$?
      grep -A14 "Per layer" $OUT/kernel_bench.log ;;
  esac
done
