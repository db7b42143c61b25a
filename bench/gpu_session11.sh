#!/usr/bin/env bash
# The GPU checks of this session's code in ONE device call (under 600 s; each step capped, a
# step cut by its cap leaves the others' files), most important first:
#   1. rocm-moe bench decode, Qwen3-30B-A3B bf16, 1 / 8 tokens, --fused-gate all --batches 16:
#      the bf16 streaming small path (ROCM_MOE_BF16_STREAM_MAX_SLOTS=8: one token) and the
#      tl.dot forms (=0; the default was 0 when this ran at 5c33a1e, 64 since)    2 x 60 s
#   2. the Gluon FP8 kernels' GPU tests (test_fp8_variants.py -k gluon)                130 s
#   3. bench/gluon_fp8_experts.py: Gluon vs Triton grouped FP8 experts, time / floor   130 s
#   4. the bf16 small path's GPU tests (test_triton_small.py -k gpu_qwen3_shape_small)  70 s
#   5. bench/sweep_bf16_small.py --shapes qwen3 --tokens 1 8 (what time is left)
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_session11.sh DIR [tag]   (each step's
# text lands in DIR as it ends, so a call cut by its limit still returns the steps before)
set -- "${1:-}" "${2:-h100}"  # (this script's tag default)
source bench/gpu_steps.sh  # OUT, TAG, J, step, finish
DEC=(python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --tokens 1 8 --fused-gate all
     --batches 16 --out "$J")
step decode_bf16_stream_qwen3 60 env ROCM_MOE_BF16_STREAM_MAX_SLOTS=8 "${DEC[@]}" \
  --name "decode_bf16_stream_qwen3_$TAG"
step decode_bf16_dot_qwen3 60 env ROCM_MOE_BF16_STREAM_MAX_SLOTS=0 "${DEC[@]}" \
  --name "decode_bf16_dot_qwen3_$TAG"
step tests_gluon 130 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 \
  tests/experts/test_fp8_variants.py -k gluon
step gluon_fp8_experts 130 python3 bench/gluon_fp8_experts.py --qwen3 1024 4096 16384 \
  --dsv3 8192 --json "$J/gluon_fp8_experts_$TAG.json"
step tests_bf16_stream 70 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 \
  tests/experts/test_triton_small.py -k gpu_qwen3_shape_small
left=$((${BUDGET_S:-585} - SECONDS))
[ "$left" -gt 30 ] && step bf16_small_sweep "$left" python3 bench/sweep_bf16_small.py \
  --shapes qwen3 --tokens 1 8 --json "$J/bf16_small_sweep_$TAG.json"
finish
