#!/usr/bin/env bash
# Issue 33's one-GPU remainders, a second call after gpu_session14.sh (under 600 s; capped):
#   1. bench/sweep_fp8_small.py --skip-check, Qwen3 at 1 token: gate/up then down candidates
#      (the FP8 one-token experts at 1.62x their floor against <= 1.6)                     120 s
#   2. rocm-moe bench decode, DeepSeek-V3 bf16 at 1 token with --kernel-table, the shared
#      expert through torch (ROCM_MOE_SHARED_STREAM_MAX_ROWS=0) then the streaming kernels
#      (=64); the reset draws on the GPU now, the constructor's still on the CPU   what is left
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_session14b.sh DIR [tag]
source bench/gpu_steps.sh  # OUT, TAG, J, step, shared_both_ways, finish
step fp8_sweep_t1 120 python3 bench/sweep_fp8_small.py "$J/fp8_sweep_t1_$TAG.env" --skip-check \
  --shapes qwen3 --tokens 1 --json "$J/fp8_sweep_t1_$TAG.json"
DEC=(python3 -m rocm_moe.cli bench decode --model deepseek-v3 --tokens 1 --fused-gate all
     --batches 8 --kernel-table --out "$J")
shared_both_ways 60 230 "${DEC[@]}"
finish
