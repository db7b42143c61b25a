#!/usr/bin/env bash
# The next device call for issue 31 / 33 (under 600 s; each step capped, most important first):
#   1. GPU tests of the warp-specialised Gluon FP8 kernels, one tile a program ("ws") and
#      persistent ("ws_persistent"): against the FP8 reference and the Triton kernels at four
#      shapes, both weight modes; graph replay                                            200 s
#   2. if they passed: bench/gluon_fp8_experts.py, Triton beside "ws" and "ws_persistent",
#      Qwen3 4096 / 16384 tokens and DeepSeek-V3 8192 rows                                 150 s
#   3. rocm-moe bench decode, Qwen3 bf16 at 1 / 8 tokens at the code's defaults (issue 33's
#      <= 40 us bf16 layer on this GPU at this code)                                        60 s
#   4. ncu of the FP8 grouped kernels at Qwen3 4096 tokens, the tuned Triton ones then
#      "ws_persistent" (issue 31's limiting factor)                                 what is left
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_session14.sh DIR [tag]
source bench/gpu_steps.sh  # OUT, TAG, J, step, finish
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
step tests_ws 200 python3 -m pytest -q -p no:cacheprovider -rs --durations=8 \
  tests/experts/test_fp8_variants.py -k "gluon and ws"
if grep -q " passed" "$OUT/tests_ws_$TAG.txt" && ! grep -q "failed\|error" "$OUT/tests_ws_$TAG.txt"; then
  step gluon_ws_experts 150 python3 bench/gluon_fp8_experts.py --qwen3 4096 16384 \
    --dsv3 8192 --configs ws ws_persistent --json "$J/gluon_ws_experts_$TAG.json"
fi
step decode_bf16_qwen3 60 python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b \
  --tokens 1 8 --fused-gate all --batches 16 --out "$J" --name "decode_bf16_qwen3_$TAG"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
NCU_ARGS=(--profile-from-start off --clock-control none -k 'regex:_fp8_gate_up_kernel|_fp8_down_kernel'
          --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
          --section Occupancy --section WarpStateStats)
for g in triton ws_persistent; do
  left=$((${BUDGET_S:-585} - SECONDS))
  extra=(); [ "$g" = triton ] || extra=(--gluon "$g")
  [ "$left" -gt 40 ] && step "ncu_fp8_$g" $(( left > 120 ? 120 : left )) "$NCU" "${NCU_ARGS[@]}" \
    python3 bench/profile_experts.py --ncu --fp8 "${extra[@]}" qwen3:4096
done
finish
