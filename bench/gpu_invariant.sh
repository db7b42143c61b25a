#!/usr/bin/env bash
# Invariant mode (issue 17) on 4 GPUs: its GPU tests (Triton experts on the torch
# (NCCL) and symm backends at W = 1, 2, 4, batches of other sizes, the fp32 path), then the
# layer benchmark at W = 4 with the invariant layer timed beside the default in the same run.
# Usage on the device machine, from the repository root (two calls, each under 10 minutes):
#   bash bench/gpu_invariant.sh "$OUT" tests [name suffix, default 4xh100]
#   bash bench/gpu_invariant.sh "$OUT" bench [name suffix, default 4xh100]
set -uo pipefail
OUT=${1:-bench/results}
STEP=${2:-all}
SUF=${3:-4xh100}
ITERS=${ITERS:-30}
R=/tmp/r_inv
mkdir -p "$R" "$OUT"
save() { tar -C /tmp -czf "$OUT/results_invariant.tgz" r_inv; }
source bench/gpu_env.sh
machine_info "$R/machine_invariant_$SUF.txt"
if [ "$STEP" != bench ]; then
echo "== invariant GPU tests =="
python3 -m pytest -q -p no:cacheprovider -rs -k gpu tests/test_invariant.py 2>&1 \
  | tee "$R/tests_invariant_$SUF.txt" | tail -15; save
fi
[ "$STEP" = tests ] && exit 0
echo "== layer, W=4, default and invariant =="
python3 -m rocm_moe.cli bench layer --invariant --tokens 1 128 4096 --iters "$ITERS" \
  --out "$R" --name "layer_invariant_$SUF" 2>&1 | grep -v -i warn \
  | tee "$R/layer_invariant_$SUF.txt"; save
