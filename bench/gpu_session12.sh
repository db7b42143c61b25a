#!/usr/bin/env bash
# Issue 33's decode measurements of session 12 in ONE device call (under 600 s; each step
# capped, a step cut by its cap leaves the others' files), most important first:
#   1. bench/copy_rate_probe.py: which copy rate the floors divide by                 40 s
#   2. rocm-moe bench decode, Qwen3-30B-A3B bf16 and block-FP8, 1 / 8 tokens, --fused-gate
#      all --batches 16, at the code's defaults (the floor from benchmarks.experts'
#      copy rate since this session)                                                 2 x 70 s
#   3. bench/sweep_bf16_small.py --down-only (the check against the oracle and PDL bits,
#      then the down candidates, PRELOAD among them) at 1 / 8 tokens                   150 s
#   4. bench/sweep_fp8_small.py --skip-check --down-only, Qwen3 and DeepSeek-V3 at 1 / 8
#      tokens (what time is left)
# Usage: [JSON_DIR=dir] [BUDGET_S=585] bash bench/gpu_session12.sh DIR [tag]
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h200}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
status=0
step() {  # name, cap, command...
  local name=$1 cap=$2
  shift 2
  echo "== $name (${SECONDS} s, cap ${cap} s) =="
  timeout "$cap" "$@" 2>&1 | grep -v -i warn | tee "$OUT/${name}_$TAG.txt" | tail -14
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "STEP $name FAILED OR CUT"; status=1; }
}
J=${JSON_DIR:-$OUT}  # the JSON files (the device returns 8 files of $OUT: give another dir)
mkdir -p "$J"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
step copy_rate_probe 40 python3 bench/copy_rate_probe.py
DEC=(python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --tokens 1 8 --fused-gate all
     --batches 16 --out "$J")
step decode_bf16_qwen3 70 "${DEC[@]}" --name "decode_bf16_qwen3_$TAG"
step decode_fp8_qwen3 70 "${DEC[@]}" --format fp8 --name "decode_fp8_qwen3_$TAG"
step bf16_down_sweep 150 python3 bench/sweep_bf16_small.py --shapes qwen3 --tokens 1 8 \
  --down-only --json "$J/bf16_down_sweep_$TAG.json"
left=$((${BUDGET_S:-585} - SECONDS))
[ "$left" -gt 30 ] && step fp8_down_sweep "$left" python3 bench/sweep_fp8_small.py \
  "$J/fp8_down_sweep_$TAG.env" --skip-check --down-only --shapes qwen3 dsv3 --tokens 1 8 \
  --json "$J/fp8_down_sweep_$TAG.json"
echo "== done in ${SECONDS} s, status ${status} =="
exit $status
