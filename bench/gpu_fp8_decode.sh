#!/usr/bin/env bash
# Issue 33 item 2, block-FP8 at decode sizes on one GPU (about 3 minutes on an H100): the
# streaming FP8 small-batch experts (rocm_moe/experts/triton_small_fp8.py) against the grouped
# FP8 path. Steps:
#   1. bench/sweep_fp8_small.py: (a) correctness on the GPU at T = 1, 8, 33, 64 (Qwen3-30B-A3B
#      and DeepSeek-V3 rank-local; -1 slots, other ranks' experts, both weight modes, float rows
#      and FP8Rows, every candidate's forms, graph replay == eager; exits 1 on a failure),
#      (b) the candidate configs at T = 1, 8, 16, 32, 64 for both shapes (median us, floor us,
#      ratio, grouped us), writing the best per size as export lines to
#      $OUT/fp8_small_env_<tag>.sh (ROCM_MOE_FP8_SMALL_CONFIG, ROCM_MOE_FP8_SMALL_MAX_SLOTS);
#   2. rocm-moe bench decode --format fp8 (Qwen3-30B-A3B, 1 / 8 / 64 tokens), paths small and
#      grouped, with the sweep's best configs exported (the layer numbers; "auto" is the small
#      path up to ROCM_MOE_FP8_SMALL_MAX_SLOTS slots and the grouped one above).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_fp8_decode.sh "$OUT" [tag]      (tag default h100)
# The lead sets the defaults from the printed export lines (triton_small_fp8.DEFAULTS and
# FP8_SMALL_MAX_SLOTS) or exports them.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_fp8_decode_$TAG.txt"
status=0
python3 bench/sweep_fp8_small.py "$OUT/fp8_small_env_$TAG.sh" 2>&1 \
  | tee "$OUT/fp8_small_sweep_$TAG.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FP8 SMALL PATH CHECK FAILED (see above)"; status=1; }
[ -f "$OUT/fp8_small_env_$TAG.sh" ] && source "$OUT/fp8_small_env_$TAG.sh"
python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --format fp8 --tokens 1 8 64 \
  --experts-path small grouped --out "$OUT" --name "decode_fp8_small_qwen3_$TAG" 2>&1 \
  | tee "$OUT/decode_fp8_small_qwen3_$TAG.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
