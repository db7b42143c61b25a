#!/usr/bin/env bash
# Session 13's second device call (under 600 s; each step capped), most important first:
#   1. the GPU tests of the warp-specialised Gluon FP8 kernels ("gluon": "ws": against the FP8
#      reference and the Triton kernels at three shapes, both weight modes; graph replay)  170 s
#   2. if they passed: bench/gluon_fp8_experts.py, Triton against "ws" and the BLOCK_M 128
#      Gluon kernels, Qwen3 1024 / 4096 / 16384 tokens and DeepSeek-V3 8192 rows           200 s
#   3. bench/copy_rate_probe.py (its read-only sum mended)                                   25 s
#   4. rocm-moe bench decode, DeepSeek-V3 bf16 at 1 token, the shared expert through torch
#      (ROCM_MOE_SHARED_STREAM_MAX_ROWS=0) and the streaming kernels (=64)          what is left
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_session13.sh DIR [tag]
source bench/gpu_steps.sh  # OUT, TAG, J, step, shared_both_ways, finish
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
step tests_ws 170 python3 -m pytest -q -p no:cacheprovider -rs --durations=8 \
  tests/experts/test_fp8_variants.py -k "gluon and ws"
if grep -q " passed" "$OUT/tests_ws_$TAG.txt" && ! grep -q "failed\|error" "$OUT/tests_ws_$TAG.txt"; then
  step gluon_ws_experts 200 python3 bench/gluon_fp8_experts.py --qwen3 1024 4096 16384 \
    --dsv3 8192 --configs 128 ws ws_persistent --json "$J/gluon_ws_experts_$TAG.json"
fi
step copy_rate_probe 25 python3 bench/copy_rate_probe.py
DEC=(python3 -m rocm_moe.cli bench decode --model deepseek-v3 --tokens 1 --fused-gate all
     --batches 8 --kernel-table --out "$J")
shared_both_ways 60 200 "${DEC[@]}"
finish
