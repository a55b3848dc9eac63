#!/usr/bin/env bash
# Two-GPU FSDP2 check of ReQAT training on the GPU host (issue 8): an uninterrupted run and a run stopped
# after 3 steps then resumed, both `accelerate launch --config_file configs/fsdp.yaml --num_processes 2`,
# must end with the same losses and bit-identical weights; the FP4 export must load.
# Prepare here: python benchmarks/fsdp_check.py prepare --out .carry/fsdp   (carry .carry and .whl)
# There:        OUT=/some/dir bash benchmarks/run_fsdp_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -c "import accelerate" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/accelerate-*.whl
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi -L
RUNS=${RUNS:-/tmp/fsdp_runs}
rm -rf "$RUNS"; mkdir -p "$RUNS" "$OUT"
ARGS="--model .carry/fsdp/model --traces .carry/fsdp/traces.jsonl --qat --sem 0.1 --batch-size 2 --grad-accum 1 \
  --max-len 128 --lr 1e-3 --save-every 1 --export-fp4"
LAUNCH="python3 -m accelerate.commands.launch --config_file configs/fsdp.yaml --num_processes 2 -m fp4reason train"
timeout 170 $LAUNCH $ARGS --out "$RUNS/a" > "$OUT/fsdp_a.log" 2>&1; echo "uninterrupted: exit $?"
timeout 170 $LAUNCH $ARGS --out "$RUNS/b" --stop-after 3 > "$OUT/fsdp_b1.log" 2>&1; echo "stopped after 3: exit $?"
timeout 170 $LAUNCH $ARGS --out "$RUNS/b" > "$OUT/fsdp_b2.log" 2>&1; echo "resumed: exit $?"
cp "$RUNS/a/train_log.jsonl" "$OUT/fsdp_a_train_log.jsonl" 2>/dev/null
cp "$RUNS/b/train_log.jsonl" "$OUT/fsdp_b_train_log.jsonl" 2>/dev/null
python3 benchmarks/fsdp_check.py compare "$RUNS/a" "$RUNS/b" 2>&1 | tee "$OUT/fsdp_compare.txt"
tail -5 "$OUT/fsdp_a.log" "$OUT/fsdp_b2.log"
