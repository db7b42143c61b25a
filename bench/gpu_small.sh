#!/usr/bin/env bash
# Issue 33 item 2 on one GPU, in one call: the small-batch experts path
# (rocm_moe/experts/triton_small.py) against today's grouped path, the same run: its GPU tests,
# bench experts / experts-fp8 (experts alone, graph-replayed, vs the weight-read floor) and
# bench decode (layer / experts / router) with --experts-path small grouped, Qwen3-30B-A3B.
# Usage on the device machine, from the repository root:
#   bash bench/gpu_small.sh "$OUT" [tag]        (tag default h100; about 6 min)
#   bash bench/gpu_small.sh "$OUT" [tag] tune   (then the tuner too: +6-8 min; its table,
#       $OUT/triton_small_configs_<tag>.json, becomes the default when copied to
#       rocm_moe/experts/triton_small_configs.json)
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_small_$TAG.txt"
python3 -m pytest -q tests/experts/test_triton_small.py 2>&1 | tail -5 \
  | tee "$OUT/small_tests_$TAG.txt"
python3 -m rocm_moe.cli bench experts --shapes qwen3 --sizes 1 2 4 8 16 32 64 128 \
  --paths small grouped --out "$OUT" --name "experts_small_$TAG" 2>&1 \
  | tee "$OUT/experts_small_$TAG.txt"
python3 -m rocm_moe.cli bench experts-fp8 --shapes qwen3 --sizes 1 2 4 8 16 32 64 \
  --paths small grouped --out "$OUT" --name "experts_fp8_small_$TAG" 2>&1 \
  | tee "$OUT/experts_fp8_small_$TAG.txt"
for fmt in bf16 fp8; do
  python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --format "$fmt" \
    --tokens 1 8 64 --experts-path small grouped --out "$OUT" \
    --name "decode_small_qwen3_${fmt}_$TAG" 2>&1 | tee "$OUT/decode_small_qwen3_${fmt}_$TAG.txt"
done
if [ "${3:-}" = tune ]; then
  python3 bench/tune_experts_small.py "$OUT/triton_small_configs_$TAG.json" --shapes qwen3 \
    2>&1 | tee "$OUT/tune_small_$TAG.txt"
fi
