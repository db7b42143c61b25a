#!/usr/bin/env bash
# The 2-GPU runs of issues 16-18 in one device call (~9 minutes; each step has its own limit so
# one that hangs cannot take the others' time): symm-fp8's GPU tests and the FP8 dispatch
# against bf16 dispatch on both backends; invariant mode's GPU tests and its cost beside the
# default layer; the whole-layer benchmark on 1 node x 2 GPUs (torch and symm, uniform and zipf).
#   bash bench/gpu_2x_remaining.sh "$OUT" [suffix, default 2xh100]
set -uo pipefail
OUT=${1:-bench/results}
SUF=${2:-2xh100}
R=/tmp/r2x
mkdir -p "$R" "$OUT"
save() { tar -C /tmp -czf "$OUT/results_2x.tgz" r2x; }
source bench/gpu_env.sh
machine_info "$R/machine_$SUF.txt"
echo "== symm-fp8 GPU tests =="
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/comm/test_symm_fp8.py 2>&1 \
  | tee "$R/tests_symm_fp8_$SUF.txt" | tail -6; save
echo "== FP8 dispatch vs bf16 dispatch, W=2, DeepSeek-V3 rows =="
timeout 100 python3 -m rocm_moe.cli bench comm --world-size 2 --comm torch torch-fp8 symm \
  symm-fp8 --tokens 128 4096 --iters 20 --out "$R" --name "comm_fp8_$SUF" 2>&1 \
  | grep -v -i warn | tee "$R/comm_fp8_$SUF.txt" | tail -25; save
echo "== invariant GPU tests =="
timeout 130 python3 -m pytest -q -p no:cacheprovider -rs -k gpu tests/test_invariant.py 2>&1 \
  | tee "$R/tests_invariant_$SUF.txt" | tail -6; save
echo "== layer, W=2, default and invariant =="
timeout 80 python3 -m rocm_moe.cli bench layer --invariant --world-size 2 --tokens 128 4096 \
  --iters 10 --out "$R" --name "layer_invariant_$SUF" 2>&1 | grep -v -i warn \
  | tee "$R/layer_invariant_$SUF.txt" | tail -20; save
echo "== layer, 1 node x 2, qwen3-30b-a3b =="
timeout 110 python3 -m rocm_moe.cli bench layer --model qwen3-30b-a3b --world-size 2 \
  --comm torch symm --skew uniform zipf --tokens 1 128 4096 16384 --iters 8 \
  --out "$R" --name "layer_qwen3-30b-a3b_1x2_$SUF" 2>&1 | grep -v -i warn \
  | tee "$R/layer_qwen3-30b-a3b_1x2_$SUF.txt" | tail -30; save
