#!/usr/bin/env bash
# Issue 18 (FP8) on NVIDIA GPUs in one device call (4x H100 expected; 1 GPU runs all but the
# W=4 dispatch benchmark). Usage on the device machine, from the repository root:
#   bash bench/gpu_fp8.sh "$OUT"
# Writes tests, accuracy and benchmark outputs (and JSON) to $OUT.
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_fp8.txt"
echo "== FP8 tests, compiled (Triton FP8 experts on the GPU) =="
python3 -m pytest -q -p no:cacheprovider -rs tests/test_quant.py tests/experts/test_fp8.py \
  tests/test_fp8_checkpoint.py tests/comm/test_torch_fp8.py 2>&1 | tee "$OUT/tests_fp8.txt" | tail -5
echo "== accuracy, Triton FP8 experts =="
python3 bench/fp8_accuracy.py --experts triton --json "$OUT/fp8_accuracy_triton.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/fp8_accuracy_triton.txt"
echo "== FP8 experts benchmark (one GPU) =="
python3 -m rocm_moe.cli bench experts-fp8 --out "$OUT" --name experts_fp8_h100 2>&1 \
  | grep -v -i warn | tee "$OUT/experts_fp8_h100.txt"
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  echo "== FP8 dispatch vs bf16 dispatch, W=4, 4096 tokens per rank =="
  python3 -m rocm_moe.cli bench comm --world-size 4 --comm torch torch-fp8 \
    --tokens 4096 --iters 30 --out "$OUT" --name comm_fp8_4xh100 2>&1 \
    | grep -v -i warn | tee "$OUT/comm_fp8_4xh100.txt"
fi
