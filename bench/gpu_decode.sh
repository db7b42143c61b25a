#!/usr/bin/env bash
# Issue 33 on one GPU, in one call: rocm-moe bench decode (W = 1; layer, experts alone, router
# alone, graph-replayed; the experts' weight-read floor at the copy rate of the same run;
# kernels per layer) for Qwen3-30B-A3B bf16 and FP8 with the local comm, the symm comm sized
# for 128, 1024 and 16384 tokens (the capacity ratio), and DeepSeek-V3 bf16 (all 256 experts
# on one GPU). Usage on the device machine, from the repository root:
#   bash bench/gpu_decode.sh "$OUT" [tag]      (tag default h100)
# Writes $OUT/decode_<case>_<tag>.txt / .json.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_decode_$TAG.txt"
run() {  # name, flags...
  local name=$1; shift
  python3 -m rocm_moe.cli bench decode --out "$OUT" --name "decode_${name}_$TAG" "$@" \
    2>&1 | tee "$OUT/decode_${name}_$TAG.txt"
}
run qwen3_bf16_symm --model qwen3-30b-a3b --comm symm --max-tokens-per-rank 128 1024 16384 \
  --tokens 1 8 128
run qwen3_bf16_local --model qwen3-30b-a3b --tokens 1 8 64 128
run qwen3_fp8_local --model qwen3-30b-a3b --format fp8 --tokens 1 8 64 128
run dsv3_bf16_local --model deepseek-v3 --tokens 1 8 128
