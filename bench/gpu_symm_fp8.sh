#!/usr/bin/env bash
# FP8 dispatch on the symm backend (issue 18, item 3) on 2 NVIDIA GPUs with peer access, in one
# device call of ~3-4 minutes. Usage on the device machine, from the repository root:
#   bash bench/gpu_symm_fp8.sh "$OUT"        (GPUs 0-1; W=4 tests need 4 visible GPUs)
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
source bench/gpu_env.sh
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
machine_info "$OUT/machine_symm_fp8.txt"
echo "== symm-fp8 tests (W=2) =="
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/comm/test_symm_fp8.py 2>&1 \
  | tee "$OUT/tests_symm_fp8.txt" | tail -15
echo "== symm vs symm-fp8 dispatch, W=2, DeepSeek-V3 rows =="
timeout 240 python3 -m rocm_moe.cli bench comm --world-size 2 --comm symm symm-fp8 \
  --tokens 128 4096 --warmup 3 --iters 20 --out "$OUT" --name comm_symm_fp8_2xh100 2>&1 \
  | grep -v -i warn | tee "$OUT/comm_symm_fp8_2xh100.txt"
