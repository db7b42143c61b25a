#!/usr/bin/env bash
# Micro-batch overlap (issue 28, EPMoE(micro_batches=2)): its GPU test and the overlap report of
# `rocm-moe bench layer --overlap` (eager stage times, the layer un-split and split, efficiency
# = split layer / max(dispatch + combine, experts); target <= 1.15 at W = 2 and 4).
# Usage on the device machine, from the repository root (each step fits one 10-minute call):
#   bash bench/gpu_overlap.sh "$OUT" tests [suffix]        # W = 1 GPU test (+ the gloo tests)
#   bash bench/gpu_overlap.sh "$OUT" bench W [suffix]      # the report at W ranks (1, 2, 4)
# suffix defaults to <W>x<gpu>, e.g. 1xh100, 4xh100. ITERS (default 10) sets the iterations.
set -uo pipefail
OUT=${1:-bench/results}
STEP=${2:-tests}
W=${3:-1}
ITERS=${ITERS:-10}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
  | grep -o -i -E 'h100|h200|mi300x|mi325x|mi355x' | tr 'A-Z' 'a-z')
if [ "$STEP" = tests ]; then SUF=${3:-1x${GPU:-gpu}}; else SUF=${4:-${W}x${GPU:-gpu}}; fi
R=/tmp/r_overlap
mkdir -p "$R" "$OUT"
save() { tar -C /tmp -czf "$OUT/results_overlap_$SUF.tgz" r_overlap; }
source bench/gpu_env.sh
machine_info "$R/machine_overlap_$SUF.txt"
if [ "$STEP" = tests ]; then
  echo "== tests/test_overlap.py: two streams == one stream, CUDA graph (W = 1), gloo ranks =="
  timeout 500 python3 -m pytest -q -p no:cacheprovider -rs tests/test_overlap.py 2>&1 \
    | tee "$R/tests_overlap_$SUF.txt" | tail -8; save
  exit 0
fi
for MODEL in qwen3-30b-a3b deepseek-v3; do
  echo "== layer --overlap, W=$W, $MODEL, torch and symm, 4096 and 16384 tokens per rank =="
  LIMIT=250; [ "$MODEL" = deepseek-v3 ] && LIMIT=320  # (its synthetic weights take a while)
  timeout "$LIMIT" python3 -m rocm_moe.cli bench layer --overlap --world-size "$W" --model "$MODEL" \
    --tokens 4096 16384 --iters "$ITERS" --out "$R" --name "layer_overlap_${MODEL}_$SUF" 2>&1 \
    | grep -v -i warn | tee "$R/layer_overlap_${MODEL}_$SUF.txt" \
    | grep -E "^overlap:|^json|Error" | head -12; save
done
