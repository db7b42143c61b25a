#!/usr/bin/env bash
# Session 13's last device call (about 130 s of device time left):
#   1. rocm-moe bench decode, Qwen3 bf16 at 1 / 8 tokens, the code's defaults (the bf16 streaming
#      experts): issue 33's <= 40 us bf16 layer on an H100 at this code                    60 s
#   2. bench/sweep_fp8_small.py --skip-check, Qwen3 at 1 token: gate/up and down candidates
#      (the FP8 one-token experts at 1.62x their floor against <= 1.6)               what is left
# Usage: [JSON_DIR=dir] [BUDGET_S=120] bash bench/gpu_session13b.sh DIR [tag]
source bench/gpu_steps.sh  # OUT, TAG, J, step, finish
step decode_bf16_qwen3 60 python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b \
  --tokens 1 8 --fused-gate all --batches 16 --out "$J" --name "decode_bf16_qwen3_$TAG"
left=$((${BUDGET_S:-120} - SECONDS))
[ "$left" -gt 30 ] && step fp8_sweep_t1 "$left" python3 bench/sweep_fp8_small.py \
  "$J/fp8_sweep_t1_$TAG.env" --skip-check --shapes qwen3 --tokens 1 --json "$J/fp8_sweep_t1_$TAG.json"
finish
