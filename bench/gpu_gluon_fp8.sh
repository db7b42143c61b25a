#!/usr/bin/env bash
# Issue 31 on one sm_90 GPU in one device call (limits add up to 540 s):
#   1. the GPU tests of the code this session changed (bf16 streaming small path, the Gluon
#      FP8 kernels): tests/experts/test_triton_small.py -k gpu, test_fp8_variants.py -k gluon
#                                                                                     <= 300 s
#   2. bench/gluon_fp8_experts.py: the grouped FP8 experts, Gluon kernels beside the Triton
#      kernels, Qwen3-30B-A3B 256..16384 tokens and DeepSeek-V3 rank-local 1024 / 8192 rows,
#      time / floor (copy rate and torch._scaled_mm's FP8 rate measured in the same run)
#                                                                                     <= 240 s
# Usage on the device machine, from the repository root:
#   bash bench/gpu_gluon_fp8.sh DIR [tag]      (tag default h100)
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
status=0
echo "== 1. GPU tests (${SECONDS} s) =="
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs --durations=10 \
  tests/experts/test_triton_small.py tests/experts/test_fp8_variants.py -k "gpu or gluon" \
  2>&1 | grep -v -i warn | tee "$OUT/tests_gluon_bf16stream_$TAG.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== 2. Gluon FP8 experts (${SECONDS} s) =="
timeout 240 python3 bench/gluon_fp8_experts.py --json "$OUT/gluon_fp8_experts_$TAG.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/gluon_fp8_experts_$TAG.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done in ${SECONDS} s, status ${status} =="
exit $status
