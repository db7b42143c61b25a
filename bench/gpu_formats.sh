#!/usr/bin/env bash
# Issue 30 item 1 (weight format as one axis of one layer) on GPUs, in one device call of a few
# minutes: the block-FP8 layer through EPMoE(weight_format=...) with the Triton FP8 kernel, the
# FP8 experts/checkpoint tests, and (with 2 visible GPUs) the symm transport with fp8_dtype=
# (tests/comm/test_symm_fp8.py builds it through the deprecated SymmFP8Dispatcher alias).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_formats.sh "$OUT"
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
echo "== formats and the one layer, FP8 experts and checkpoint (one GPU) =="
timeout 400 python3 -m pytest -q -p no:cacheprovider -rs tests/test_formats.py \
  tests/test_weight_format_layer.py tests/experts/test_fp8.py tests/test_fp8_checkpoint.py \
  tests/comm/test_imports.py 2>&1 | tee "$OUT/tests_formats_gpu.txt" | tail -10
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  echo "== symm transport with FP8 rows (W=2) =="
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/comm/test_symm_fp8.py 2>&1 \
    | tee "$OUT/tests_symm_fp8_formats.txt" | tail -10
fi
