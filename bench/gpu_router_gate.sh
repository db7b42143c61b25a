#!/usr/bin/env bash
# The Triton gate GEMM + router (issue 33: routing.gate_route, EPMoE(fused_gate=...)) on one GPU:
# its GPU tests, then bench/router.py's two tables (router alone; torch gate + Triton router vs
# the Triton gate + router vs the weight-read floor, with a sweep of gate plans) for Qwen3-30B-A3B
# and DeepSeek-V3 at 1, 8, 64 and 128 tokens, CUDA-graph replayed; then the DeepSeek-V3 decode
# layer (W = 1, bf16, all 256 experts: 22.5 GB) with --fused-gate off and float32. Each step has
# its own time limit (150 + 200 + 2 x 90 s: under 9 minutes in all, about 5 expected).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_router_gate.sh "$OUT" [tag]
# Writes $OUT/machine_router_gate_<tag>.txt, tests_router_gate_<tag>.txt,
# router_gate_<tag>.{txt,json} and decode_router_gate_dsv3_{off,float32}_<tag>.{txt,json}.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_router_gate_$TAG.txt"
XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 2 --dist loadfile)
echo "== GPU tests: the Triton gate + router, the router =="
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs ${XDIST[@]+"${XDIST[@]}"} tests/test_gate_triton.py \
  tests/test_routing_triton.py > "$OUT/tests_router_gate_$TAG.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests_router_gate_$TAG.txt"
grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" "$OUT/tests_router_gate_$TAG.txt" | tail -25
echo "== router alone; gate + router: torch gate + Triton router vs Triton gate + router =="
{ cat "$OUT/machine_router_gate_$TAG.txt"
  echo "python3 bench/router.py --sizes 1 8 64 128 --inner 20 --replays 200 --sweep --routers qwen3-30b-a3b deepseek-v3 kimi-k2"
  timeout 200 python3 bench/router.py --sizes 1 8 64 128 --inner 20 --replays 200 --sweep \
    --routers qwen3-30b-a3b deepseek-v3 kimi-k2 \
    --out "$OUT/router_gate_$TAG.json" 2>&1 | grep -v -i warn
} | tee "$OUT/router_gate_$TAG.txt"
for gate in off float32; do
  echo "== decode layer: deepseek-v3 bf16, --fused-gate $gate =="
  timeout 90 python3 -m rocm_moe.cli bench decode --model deepseek-v3 --tokens 1 8 128 \
    --fused-gate "$gate" --out "$OUT" --name "decode_router_gate_dsv3_${gate}_$TAG" 2>&1 \
    | grep -E "│|decode at" | tee "$OUT/decode_router_gate_dsv3_${gate}_$TAG.txt"
done
