#!/usr/bin/env bash
# Kernel tuning call on the GPU host: build, GPU kernel tests, ncu summary, bench with split/variant sweep.
# Usage there: OUT=/some/dir bash benchmarks/run_kernel_tuning.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/site
python3 -c "from fp4reason.kernels import cuda; print(cuda.build_library())" 2>&1 | tail -2
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py > $OUT/kernel_tests.txt 2>&1; echo tests=$?; tail -3 $OUT/kernel_tests.txt
timeout 90 ncu --clock-control none -k regex:nvfp4_gemv --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats python3 benchmarks/kernel_profile.py > $OUT/ncu.txt 2>&1; echo ncu=$?
grep -E "nvfp4_gemv_kernel|Duration|DRAM Throughput|Issued Warp|Registers Per|Achieved Occ" $OUT/ncu.txt | sed -E 's/\(const unsigned.*\) \(/ (/' | cut -c1-100
timeout 330 python3 benchmarks/kernel_bench.py --m 1,2,4,8,16 --sweep --out $OUT/kernel > $OUT/kernel_bench.log 2>&1; echo bench=$?
grep -A12 "Per layer" $OUT/kernel_bench.log
grep -oE "N=[0-9]+ K=[0-9]+ M=[0-9]+|splits=[0-9]+ |ours=[0-9.]+|best=v[0-9]_s[0-9]+|best_us=[0-9.]+|humming=[0-9.]+" $OUT/kernel_bench.log | paste -d' ' - - - - - - | head -40
