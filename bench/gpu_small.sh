#!/usr/bin/env bash
# Issue 33 item 2 on one GPU: the small-batch experts path (rocm_moe/experts/triton_small.py)
# against today's grouped path, in the same run. Parts (each fits one 10-minute device call):
#   tests    its GPU tests (Qwen3 shape bf16 + FP8, small vs grouped vs reference, graphs)
#   experts  bench experts / experts-fp8 --paths small grouped (experts alone, graph-replayed,
#            against the weight-read floor), Qwen3-30B-A3B, 1-128 tokens
#   decode   bench decode --experts-path small grouped (layer / experts / router), bf16 + FP8
#   tune-bf16, tune-fp8   bench/tune_experts_small.py (writes $OUT/triton_small_configs_<tag>_
#            <fmt>.json, the second run's table holding both formats; copied to
#            rocm_moe/experts/triton_small_configs.json, its entries become the default on
#            this device)
# Usage on the device machine, from the repository root:
#   bash bench/gpu_small.sh "$OUT" [tag] [part ...]     (tag default h100; parts default
#                                                        "experts decode")
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
shift $(( $# >= 2 ? 2 : $# ))
PARTS=${*:-experts decode}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_small_$TAG.txt"
for part in $PARTS; do
  case $part in
    tests)
      python3 -m pytest -q tests/experts/test_triton_small.py 2>&1 | tail -5 \
        | tee "$OUT/small_tests_$TAG.txt" ;;
    experts)
      python3 -m rocm_moe.cli bench experts --shapes qwen3 --sizes 1 2 4 8 16 32 64 128 \
        --paths small grouped --out "$OUT" --name "experts_small_$TAG" 2>&1 \
        | tee "$OUT/experts_small_$TAG.txt"
      python3 -m rocm_moe.cli bench experts-fp8 --shapes qwen3 --sizes 1 2 4 8 16 32 64 \
        --paths small grouped --out "$OUT" --name "experts_fp8_small_$TAG" 2>&1 \
        | tee "$OUT/experts_fp8_small_$TAG.txt" ;;
    decode)
      for fmt in bf16 fp8; do
        python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --format "$fmt" \
          --tokens 1 8 64 --experts-path small grouped --out "$OUT" \
          --name "decode_small_qwen3_${fmt}_$TAG" 2>&1 \
          | tee "$OUT/decode_small_qwen3_${fmt}_$TAG.txt"
      done ;;
    tune-bf16|tune-fp8)  # the second format's table starts from the first one's
      fmt=${part#tune-}
      other=$OUT/triton_small_configs_${TAG}_$([ "$fmt" = fp8 ] && echo bf16 || echo fp8).json
      base=(); [ -f "$other" ] && base=(--base "$other")
      python3 bench/tune_experts_small.py "$OUT/triton_small_configs_${TAG}_$fmt.json" \
        --shapes qwen3 --formats "$fmt" ${base[@]+"${base[@]}"} 2>&1 \
        | tee "$OUT/tune_small_${TAG}_$fmt.txt" ;;
    *) echo "unknown part: $part (tests experts decode tune-bf16 tune-fp8)" >&2; exit 2 ;;
  esac
done
