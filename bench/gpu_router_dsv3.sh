#!/usr/bin/env bash
# Issue 33's router target (<= 8 us at 1-128 tokens) on one GPU: bench/router_plans.py checks
# every candidate plan of the Triton gate GEMM + router (tiles, splits of H, router rows /
# warps, PDL either side) against the float64 GEMM, today's Triton router
# bits and the torch router, eager and CUDA-graph replayed (exit 1 on any failure), and times
# gate + route,
# the GEMM alone and the router alone for Qwen3-30B-A3B and DeepSeek-V3 at 1, 8, 64, 128 tokens
# (31 plans), then prints the best plan per size; then bench/router.py's tables for both
# routers at 1, 8, 128 tokens with today's defaults. At most 150 s (105 + 40 s limits);
# "tests" as a third argument adds the Triton gate's and router's GPU tests (150 s more).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_router_dsv3.sh "$OUT" [tag] [tests]
# Writes $OUT/machine_router_dsv3_<tag>.txt, router_plans_<tag>.{txt,json},
# router_dsv3_<tag>.{txt,json} (and tests_router_dsv3_<tag>.txt).
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_router_dsv3_$TAG.txt" > /dev/null
status=0
echo "== gate + route plans: checked, then timed (median us, 200 replays x 20 calls) =="
timeout 105 python3 bench/router_plans.py --replays 200 --inner 20 \
  --out "$OUT/router_plans_$TAG.json" 2>&1 | grep -v -i warn | tee "$OUT/router_plans_$TAG.txt"
rc=${PIPESTATUS[0]}
echo "router_plans exit $rc" | tee -a "$OUT/router_plans_$TAG.txt"
[ "$rc" -ne 0 ] && status=1
echo "== bench/router.py, today's defaults =="
{ cat "$OUT/machine_router_dsv3_$TAG.txt"
  echo "python3 bench/router.py --sizes 1 8 128 --inner 20 --replays 200 --routers qwen3-30b-a3b deepseek-v3"
  timeout 40 python3 bench/router.py --sizes 1 8 128 --inner 20 --replays 200 \
    --routers qwen3-30b-a3b deepseek-v3 --out "$OUT/router_dsv3_$TAG.json" 2>&1 | grep -v -i warn
} | tee "$OUT/router_dsv3_$TAG.txt"
if [ "${3:-}" = tests ]; then
  echo "== GPU tests: the Triton gate + router =="
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gate_triton.py \
    tests/test_gate_plans.py tests/test_routing_triton.py > "$OUT/tests_router_dsv3_$TAG.txt" 2>&1
  echo "pytest exit $?" >> "$OUT/tests_router_dsv3_$TAG.txt"
  grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" "$OUT/tests_router_dsv3_$TAG.txt" | tail -25
fi
exit $status
