#!/usr/bin/env bash
# GPU-host driver: GPU tests and benchmarks, each with its own time limit, logs and JSON in $OUT.
# Usage there:  OUT=/some/dir bash benchmarks/run_gpu.sh [build] [tests] [xf] [norm] [recheck] [sampler] [fakequant] [qat] [kernel] [e2e] [ab] [attn] [profile] [grids] [srcprof]
# (env: QAT_MODES, QAT_PROFILE=1, KERNEL_M, KERNEL_XF (kernel_bench --xf), KERNEL_NORM=1 (--norm), E2E_LIMIT,
# E2E_NEW; build: the kernel library alone, so the next stage's limit is not spent compiling (a library built
# ahead with FP4REASON_CACHE=.carry/cache and carried is used if one launch of it is right, else rebuilt); ab: AB="ENV=1
# ENV=0 A=1,B=2 ..." runs a short NVFP4 e2e_bench once per setting (commas join variables; AB_REPEAT=N rounds), AB_BATCHES,
# AB_VARIANTS; attn: the attention GPU tests with FP4REASON_ATTN_EARLY_POS=1, then the attention bench per ATTN_AB
# setting (as AB); xf: the GPU tests of the XF variants 10 / 11;
# norm: the GPU tests of the add + RMSNorm variants 12 / 13 and the engine's fold, and W4A16 decode checks with it)
# (no argument = all). Copy $OUT into benchmarks/results/ afterwards.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# wheels carried in .whl/ (humming-kernels for the kernel bench's peer column): no index on the GPU host
ls .whl/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
stages=${*:-tests sampler fakequant qat kernel e2e}
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "exit=$?"; tail -n 30 "$OUT/$name.log"
  # TAR_TO=FILE: an archive of $OUT after every step, so a call cut off at its time limit still returns the
  # finished steps (and one file, however many logs: a device call returns at most 8)
  if [ -n "${TAR_TO:-}" ]; then tar -czf "$TAR_TO" -C "$(dirname "$OUT")" "$(basename "$OUT")"; fi
}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for s in $stages; do
  case $s in
    build) step build 240 sh -c "python3 benchmarks/build_check.py || python3 benchmarks/build_check.py --force" ;;
    tests) step gpu_tests 300 python3 -m pytest -q -m "gpu or slow" -p no:cacheprovider -p no:logging \
             tests/test_kernels.py tests/test_engine.py tests/test_engine_triton.py tests/test_quant.py \
             tests/test_sampling.py tests/test_sampling_triton.py ;;
    xf) step xf_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging tests/test_kernels.py \
          -k "(every_variant and (10 or 11)) or (any_grid and (10- or 11-))" ;;
    norm) step norm_tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging tests/test_kernels.py \
            tests/test_engine.py -k "norm"
          for b in 1 8; do
            step "decode_check_norm_b$b" 100 env FP4REASON_NORM_FOLD=8 python3 benchmarks/decode_check.py \
              --variant nvfp4-w4a16 --batch "$b" --steps 64
          done ;;
    recheck) step gpu_recheck 150 python3 -m pytest -q -m "gpu or slow" -p no:cacheprovider -p no:logging \
             -k "cuda_graphs or torch_compile" tests/test_kernels.py tests/test_engine.py ;;
    sampler) step sampler_overhead 120 python3 benchmarks/sampler_overhead.py --device cuda --out "$OUT/sampler_overhead_gpu.json" ;;
    fakequant) step fakequant_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_fakequant_triton.py tests/test_norm_act_triton.py
             step fakequant_bench 120 python3 benchmarks/fakequant_bench.py --out "$OUT/fakequant_bench.json" ;;
    qat) step qat_throughput 240 python3 benchmarks/qat_throughput.py ${QAT_MODES:+--modes "$QAT_MODES"} \
           ${QAT_PROFILE:+--profile} --out "$OUT/qat_throughput.json" ;;
    kernel) step kernel_bench 300 python3 benchmarks/kernel_bench.py --m "${KERNEL_M:-1,2,4,8,16}" ${KERNEL_XF:+--xf "$KERNEL_XF"} \
             ${KERNEL_NORM:+--norm} --out "$OUT/kernel" ;;
    grids) for v in ${GRID_VARIANTS:-default}; do  # CTAs-per-SM grid policies per kernel variant (0 = split-K)
             if [ "$v" = default ]; then e=(); else e=("FP4REASON_VARIANT=$v"); fi
             step "kernel_grids_$v" 200 env "${e[@]}" python3 \
               benchmarks/kernel_bench.py --m "${KERNEL_M:-1,16}" --only-ours --grids "${GRIDS:-0,3,4,5,6,8}" \
               --out /tmp/grids_$v
             cp /tmp/grids_$v/kernel_bench.md "$OUT/kernel_grids_$v.md"
           done ;;
    srcprof) step ncu_source 240 ncu --clock-control none -k regex:nvfp4_gemv --launch-count "${SRC_LAUNCHES:-2}" \
               --section SourceCounters --section WarpStateStats -f -o /tmp/src python3 benchmarks/kernel_profile.py
             ncu -i /tmp/src.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_source_sass.csv" 2>&1
             ncu -i /tmp/src.ncu-rep --page details > "$OUT/ncu_source_details.txt" 2>&1 ;;
    ab) ab_files=()
        for r in $(seq "${AB_REPEAT:-1}"); do  # rounds through all settings: the spread between rounds
          for setting in ${AB:-FP4REASON_PDL_OPS=1 FP4REASON_PDL_OPS=0}; do
            n=e2e_ab_${setting//[^A-Za-z0-9]/_}${AB_REPEAT:+_r$r}
            step "$n" 150 env ${setting//,/ } python3 benchmarks/e2e_bench.py \
              --variants "${AB_VARIANTS:-nvfp4-w4a16,nvfp4-w4a4}" --batches "${AB_BATCHES:-1,8}" --new-tokens 256 \
              --long-len 0 --no-compare-attn --out "$OUT/$n.json"
            if [ -f "$OUT/$n.json" ]; then ab_files+=("$OUT/$n.json"); fi
          done
        done
        # one table: each setting against the first, with the rounds' range
        if [ ${#ab_files[@]} -gt 0 ]; then
          step ab_summary 60 python3 benchmarks/ab_summary.py "${ab_files[@]}" --out "$OUT/ab_summary.md"
        fi ;;
    attn) step attn_tests_early_pos 150 env FP4REASON_ATTN_EARLY_POS=1 python3 -m pytest -q -m gpu -p no:cacheprovider \
            -p no:logging tests/test_engine_triton.py
          for setting in ${ATTN_AB:-FP4REASON_ATTN_EARLY_POS=1 FP4REASON_ATTN_EARLY_POS=0}; do
            n=${setting//[^A-Za-z0-9]/_}
            step "attn_bench_$n" 120 env ${setting//,/ } python3 benchmarks/attn_bench.py \
              --batches "${ATTN_BATCHES:-1,4,8,16}" --out "$OUT/attn_bench_$n.json"
          done ;;
    profile) step step_profile 240 python3 benchmarks/step_profile.py --graph --layers "${PROFILE_LAYERS:-8}" \
               --batches "${PROFILE_BATCHES:-1,8}" --variants "${PROFILE_VARIANTS:-bf16,nvfp4-w4a16,nvfp4-w4a4}" ;;
    e2e) step e2e_bench "${E2E_LIMIT:-480}" python3 benchmarks/e2e_bench.py --new-tokens "${E2E_NEW:-1024}" --out "$OUT/e2e.json" ;;
  esac
done
echo "=== done ($(date +%T))"
