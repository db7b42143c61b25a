#!/usr/bin/env bash
# The Triton gate GEMM + router (issue 33: routing.gate_route, EPMoE(fused_gate=...)) on one GPU:
# its GPU tests, then bench/router.py's two tables (router alone; torch gate + Triton router vs
# the Triton gate + router vs the weight-read floor, with a sweep of gate plans) for Qwen3-30B-A3B
# and DeepSeek-V3 at 1, 8, 64 and 128 tokens, CUDA-graph replayed. About 3 minutes on one H100.
# Usage on the device machine, from the repository root:
#   bash bench/gpu_router_gate.sh "$OUT" [tag]
# Writes $OUT/machine_router_gate_<tag>.txt, tests_router_gate_<tag>.txt and
# router_gate_<tag>.{txt,json}.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_router_gate_$TAG.txt"
echo "== GPU tests: the Triton gate + router, the router, the layer's fused_gate =="
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gate_triton.py \
  tests/test_routing_triton.py > "$OUT/tests_router_gate_$TAG.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests_router_gate_$TAG.txt"
grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" "$OUT/tests_router_gate_$TAG.txt" | tail -25
echo "== router alone; gate + router: torch gate + Triton router vs Triton gate + router =="
{ cat "$OUT/machine_router_gate_$TAG.txt"
  timeout 240 python3 bench/router.py --sizes 1 8 64 128 --inner 20 --replays 200 --sweep \
    --out "$OUT/router_gate_$TAG.json" 2>&1 | grep -v -i warn
} | tee "$OUT/router_gate_$TAG.txt"
