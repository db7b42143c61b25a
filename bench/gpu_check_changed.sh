#!/usr/bin/env bash
# A short device call (about 5 minutes on one H100/H200) for a session with little device time:
#   1. the GPU tests of the files changed or failing since the last whole-suite run (default
#      list below, or the files given after the tag), 16 xdist workers, stopped with SIGINT at
#      LIMIT seconds (default 210; the summary of what ran is still printed);
#   2. issue 33's symm capacity check: the layer at 1 and 8 tokens with buffers for 128 and
#      16384 tokens per rank, W = 1, with each kernel, copy and memset listed (<= 100 s).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_check_changed.sh "$OUT" [tag] [test files...]
# Writes $OUT/tests_gpu_changed_<tag>.txt and decode_symm_kernels_<tag>.{txt,json}.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
shift 2 || true
mkdir -p "$OUT"
source bench/gpu_env.sh
FILE="$OUT/tests_gpu_changed_$TAG.txt"
machine_info "$FILE"
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/comm/test_symm.py tests/comm/test_symm_fp8.py tests/test_overlap.py
         tests/test_model.py tests/test_graphs.py tests/test_invariant.py tests/test_chunks.py
         tests/test_families_longcat.py tests/test_zero_experts.py tests/test_families_parity.py
         tests/test_gate_triton.py tests/test_layer.py tests/test_benchmarks.py)
fi
echo "== GPU tests (limit ${LIMIT:-210} s): ${TESTS[*]} ==" | tee -a "$FILE"
timeout -s INT -k 30 "${LIMIT:-210}" python3 -m pytest -v -p no:cacheprovider -rfEs \
  -n 16 --dist loadfile "${TESTS[@]}" >> "$FILE" 2>&1
echo "pytest exit $? (124/130: cut at the limit)" | tee -a "$FILE"
grep -E "^(FAILED|ERROR) |\] (FAILED|ERROR) " "$FILE" | sort -u | head -40
echo "passed: $(grep -c '\] PASSED ' "$FILE"), skipped: $(grep -c '\] SKIPPED ' "$FILE")"
tail -n 1 "$FILE"
echo "== symm capacity 128 vs 16384, kernel table =="
timeout 100 python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --comm symm \
  --max-tokens-per-rank 128 16384 --tokens 1 8 --fused-gate all --kernel-table \
  --out "$OUT" --name "decode_symm_kernels_$TAG" 2>&1 | grep -v -i warn \
  | tee "$OUT/decode_symm_kernels_$TAG.txt"
