#!/usr/bin/env bash
# Issue 30 items 2 and 5 on one GPU in one device call: the Triton experts' variants and the
# MXFP4 experts compiled (bf16 on the GPU), gpt-oss through rocm-moe run from a tiny MXFP4
# checkpoint, and bench experts' gpt-oss rows (bf16 vs MXFP4 vs each weight-read floor).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_mxfp4.sh "$OUT"
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
echo "== variants and MXFP4 tests, compiled =="
python3 -m pytest -q -p no:cacheprovider -rs tests/experts/test_triton_variants.py \
  tests/experts/test_mxfp4.py tests/test_formats_mxfp4.py tests/test_gpt_oss_mxfp4.py \
  "tests/test_families_variants.py::test_triton_gpt_oss_layer_matches_the_oracle_on_a_gpu" \
  2>&1 | tee "$OUT/tests_mxfp4_gpu.txt" | tail -8
echo "== bench experts: gpt-oss-20b / 120b, bf16 vs MXFP4 =="
python3 -m rocm_moe.cli bench experts --shapes gpt-oss-20b gpt-oss-120b --formats bf16 mxfp4 \
  --out "$OUT" --name experts_mxfp4_gpu 2>&1 | grep -v -i warn | tee "$OUT/experts_mxfp4_gpu.txt"
