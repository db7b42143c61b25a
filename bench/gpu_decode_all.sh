#!/usr/bin/env bash
# Issue 33 on one GPU in one device call (about 7.5 minutes on an H100): every decode sweep that
# was written but never timed, each under its own time limit so the call always returns:
#   1. bench/gpu_router_dsv3.sh: the gate + router plans (fills _gate_triton.TUNED)   <= 150 s
#   2. bench/gpu_fp8_decode.sh: the streaming FP8 small path vs grouped (FP8 auto limit) <= 200 s
#   3. rocm-moe bench decode --comm symm at capacity 128 vs 16384 with the kernel table
#      (copies and memsets listed too): the capacity ratio after the push-kernel change <= 90 s
# Usage on the device machine, from the repository root:
#   bash bench/gpu_decode_all.sh "$OUT" [tag]      (tag default h100)
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
status=0
echo "== 1. router plans (${SECONDS} s) =="
timeout 155 bash bench/gpu_router_dsv3.sh "$OUT" "$TAG" || status=1
echo "== 2. FP8 small path (${SECONDS} s) =="
timeout 200 bash bench/gpu_fp8_decode.sh "$OUT" "$TAG" 2>&1 | grep -v -i warn | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== 3. symm capacity 128 vs 16384, kernel table (${SECONDS} s) =="
timeout 90 python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --comm symm \
  --max-tokens-per-rank 128 16384 --tokens 1 8 --fused-gate all --kernel-table \
  --out "$OUT" --name "decode_symm_kernels_$TAG" 2>&1 | grep -v -i warn \
  | tee "$OUT/decode_symm_kernels_$TAG.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done in ${SECONDS} s, status ${status} =="
exit $status
