#!/usr/bin/env bash
# Session 12's second device call (under 600 s; each step capped, most important first):
#   1. rocm-moe bench decode, Qwen3-30B-A3B bf16 and block-FP8 at 1 / 8 tokens, the code's
#      defaults (after gpu_session12.sh's down sweeps; the floor from benchmarks.experts'
#      copy rate)                                                                   2 x 70 s
#   2. ncu of the grouped block-FP8 experts' kernels (issue 31's limiting factor): Qwen3 4096
#      tokens and DeepSeek-V3's 8192 rank-local rows: SpeedOfLight, compute and memory
#      workload, warp states, occupancy                                         what is left
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_session12b.sh DIR [tag]
source bench/gpu_steps.sh  # OUT, TAG, J, step, finish
DEC=(python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --tokens 1 8 --fused-gate all
     --batches 16 --out "$J")
step decode_bf16_qwen3 70 "${DEC[@]}" --name "decode_bf16_qwen3_$TAG"
step decode_fp8_qwen3 70 "${DEC[@]}" --format fp8 --name "decode_fp8_qwen3_$TAG"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
left=$((${BUDGET_S:-585} - SECONDS))
step ncu_fp8_experts "$left" "$NCU" --profile-from-start off --clock-control none \
  -k 'regex:_fp8_gate_up_kernel|_fp8_down_kernel' --section SpeedOfLight \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
  --section LaunchStats --section WarpStateStats --section SchedulerStats \
  python3 bench/profile_experts.py --ncu --fp8 qwen3:4096 dsv3:8192
finish
