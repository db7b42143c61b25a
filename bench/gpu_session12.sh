#!/usr/bin/env bash
# Session 12's first device call (under 600 s; each step capped, a step cut by its cap leaves
# the others' files), most important first:
#   1. bench/copy_rate_probe.py: which copy rate the floors divide by                 25 s
#   2. bench/sweep_bf16_small.py --down-only, Qwen3 at 1 / 8 tokens (every candidate checked
#      against the float64 oracle and for PDL's bits, then the down candidates timed,
#      PRELOAD among them)                                                             140 s
#   3. bench/sweep_fp8_small.py --skip-check --down-only, Qwen3 at 1 / 8 tokens        100 s
#   4. the GPU tests of this session's code: the FP8 PDL chain with PRELOAD (the same bits)
#      and the shared experts' streaming SwiGLU                                        150 s
#   5. rocm-moe bench decode, Qwen3 block-FP8 at 1 / 8 tokens (the <= 25 us target at the
#      code's defaults)                                                                 60 s
#   6. rocm-moe bench decode, DeepSeek-V3 bf16 at 1 / 8 tokens, the shared expert through
#      torch (ROCM_MOE_SHARED_STREAM_MAX_ROWS=0) and the streaming kernels (=64)   what is left
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_session12.sh DIR [tag]
source bench/gpu_steps.sh  # OUT, TAG, J, step, shared_both_ways, finish
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
step copy_rate_probe 25 python3 bench/copy_rate_probe.py
step bf16_down_sweep 140 python3 bench/sweep_bf16_small.py --shapes qwen3 --tokens 1 8 \
  --down-only --json "$J/bf16_down_sweep_$TAG.json"
step fp8_down_sweep 100 python3 bench/sweep_fp8_small.py "$J/fp8_down_sweep_$TAG.env" \
  --skip-check --down-only --shapes qwen3 --tokens 1 8 --json "$J/fp8_down_sweep_$TAG.json"
step tests_s12 150 python3 -m pytest -q -p no:cacheprovider -rs --durations=8 \
  tests/experts/test_triton_small.py tests/experts/test_triton_small_fp8.py \
  -k "shared or gpu_pdl"
step decode_fp8_qwen3 60 python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b \
  --tokens 1 8 --fused-gate all --batches 16 --format fp8 --out "$J" \
  --name "decode_fp8_qwen3_$TAG"
DEC=(python3 -m rocm_moe.cli bench decode --model deepseek-v3 --tokens 1 8 --fused-gate all
     --batches 16 --kernel-table --out "$J")
shared_both_ways 50 130 "${DEC[@]}"
finish
