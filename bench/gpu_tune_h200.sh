#!/usr/bin/env bash
# Issue 31's per-device tables for a GPU that has none (the packaged ones hold H100 entries
# only; an H200 gets the heuristic): one call, under 600 s, each step capped.
#   1. bench/tune_experts.py, the grouped bf16 experts, every size of both shapes, each kernel
#      timed with L2 cleared; merged into the packaged table                            300 s
#   2. bench/tune_experts_fp8.py, the grouped FP8 experts, both shapes, candidates checked
#      against the FP8 reference before they are timed; merged into the packaged table  what is
#                                                                                       left
# The two tables come back in DIR (triton_configs.json, triton_fp8_configs.json): copy them over
# rocm_moe/experts/ once a benchmark on the same GPU has shown them ahead of the heuristic
# (bench/gpu_session*.sh's `rocm-moe bench experts` / `experts-fp8`, ROCM_MOE_FP8_CONFIGS for
# the FP8 table before it is packaged).
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_tune_h200.sh DIR [tag]
source bench/gpu_steps.sh  # OUT, TAG, J, step, finish
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
step tune_bf16 300 python3 bench/tune_experts.py "$J/triton_configs.json" \
  --base rocm_moe/experts/triton_configs.json
left=$((${BUDGET_S:-585} - SECONDS))
[ "$left" -gt 90 ] && step tune_fp8 "$left" python3 bench/tune_experts_fp8.py \
  --table "$J/triton_fp8_configs.json" --json "$J/tune_fp8_$TAG.json" \
  --budget-s $((left - 60))
finish
