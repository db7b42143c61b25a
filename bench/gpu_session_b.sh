#!/usr/bin/env bash
# One device call (about 5 minutes on one H100) after the whole suite, for the session's GPU
# numbers: the Triton gate + router against torch's gate GEMM + the Triton router (issue 33; it
# decides routing.FUSED_GATE_DEFAULT), the Qwen3 decode layer with the gate on and off (the 40 us
# target at 1 token), and the micro-batch overlap report at W = 1 (issue 28). Each step has its
# own time limit so the call always returns; the tables go to stdout too (files may not return).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_session_b.sh "$OUT" [tag]
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
source bench/gpu_env.sh
machine_info "$OUT/machine_session_b_$TAG.txt"
echo "== router: torch gate + Triton router vs Triton gate + router (qwen3, deepseek-v3, kimi-k2) =="
{ cat "$OUT/machine_session_b_$TAG.txt"
  echo "python3 bench/router.py --sizes 1 8 64 128 --inner 20 --replays 200 --sweep --routers qwen3-30b-a3b deepseek-v3 kimi-k2"
  timeout 170 python3 bench/router.py --sizes 1 8 64 128 --inner 20 --replays 200 --sweep \
    --routers qwen3-30b-a3b deepseek-v3 kimi-k2 --out "$OUT/router_gate_$TAG.json" 2>&1 \
    | grep -v -i warn
} | tee "$OUT/router_gate_$TAG.txt" | grep -v "^  plan" | tail -40
for gate in off all; do
  echo "== decode layer: qwen3 bf16, --fused-gate $gate =="
  timeout 60 python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --format bf16 \
    --tokens 1 8 64 --fused-gate "$gate" --out "$OUT" --name "decode_gate_qwen3_${gate}_$TAG" 2>&1 \
    | grep -E "│|decode at" | tee "$OUT/decode_gate_qwen3_${gate}_$TAG.txt"
done
echo "== layer --overlap, W=1, qwen3-30b-a3b, 4096 tokens =="
timeout 130 python3 -m rocm_moe.cli bench layer --overlap --world-size 1 --model qwen3-30b-a3b \
  --tokens 4096 --iters 10 --out "$OUT" --name "layer_overlap_qwen3_1x$TAG" 2>&1 \
  | grep -v -i warn | tee "$OUT/layer_overlap_qwen3_1x$TAG.txt" | tail -30
