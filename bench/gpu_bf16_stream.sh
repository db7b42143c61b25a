#!/usr/bin/env bash
# Issue 33, the bf16 one-token layer on one GPU in one device call (limits add up to 560 s):
#   1. bench/sweep_bf16_small.py: the bf16 small-batch experts three ways (the streaming
#      kernels with bf16 weights: defaults and candidates; the tl.dot forms; the grouped path),
#      Qwen3-30B-A3B and DeepSeek-V3 rank-local, 1 / 2 / 4 / 8 tokens, cold weights; every
#      candidate checked against the float64 oracle first (exit 1 on a failure)      <= 240 s
#   2. rocm-moe bench decode, bf16, --fused-gate all --batches 16 (as gpu_decode_all.sh), the
#      layer with the bf16 streaming experts (ROCM_MOE_BF16_STREAM_MAX_SLOTS=8) and without
#      them (0, the default: the tl.dot forms), same run: Qwen3 1 / 8 tokens,
#      DeepSeek-V3 1 / 8 tokens                                                     <= 80 s each
# Usage on the device machine, from the repository root:
#   bash bench/gpu_bf16_stream.sh DIR [tag]      (tag default h100)
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
status=0
echo "== 1. sweep (${SECONDS} s) =="
timeout 240 python3 bench/sweep_bf16_small.py --json "$OUT/bf16_small_sweep_$TAG.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/bf16_small_sweep_$TAG.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

decode() {  # name, stream limit ("" = default), then rocm-moe bench decode's flags
  local name=$1 limit=$2
  shift 2
  echo "== $name (${SECONDS} s) =="
  ROCM_MOE_BF16_STREAM_MAX_SLOTS=$limit timeout 80 python3 -m rocm_moe.cli bench decode "$@" \
    --fused-gate all --batches 16 --out "$OUT" --name "${name}_$TAG" 2>&1 | grep -v -i warn \
    | tee "$OUT/${name}_$TAG.txt" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

decode decode_bf16_stream_qwen3 8 --model qwen3-30b-a3b --tokens 1 8
decode decode_bf16_dot_qwen3 0 --model qwen3-30b-a3b --tokens 1 8
decode decode_bf16_stream_dsv3 8 --model deepseek-v3 --tokens 1 8
decode decode_bf16_dot_dsv3 0 --model deepseek-v3 --tokens 1 8
echo "== done in ${SECONDS} s, status ${status} =="
exit $status
