#!/usr/bin/env bash
# One short device call (about 4.5 minutes on one H100) for a session whose device time is nearly
# spent: the GPU tests of what changed since the last whole-suite run, then the decode numbers
# (issue 33: both experts paths side by side, the router alone with its gate GEMM) and the
# gpt-oss MXFP4 rows (issue 30). Each step has its own time limit so the call always returns.
# Usage on the device machine, from the repository root:
#   bash bench/gpu_session_check.sh "$OUT" [tag] [test files...]
# Writes $OUT/tests_gpu_check_<tag>.txt, decode_check_*_<tag>.{txt,json}, router_<tag>.{txt,json}
# and experts_mxfp4_<tag>.{txt,json}.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
shift 2 || true
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
source bench/gpu_env.sh
machine_info "$OUT/machine_check_$TAG.txt"
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/test_routing_triton.py tests/test_routing_triton_checks.py
         tests/test_families_variants.py tests/test_families_gpt_oss.py tests/test_gpt_oss_mxfp4.py
         tests/experts/test_mxfp4.py tests/experts/test_triton_variants.py
         tests/experts/test_triton_small.py tests/test_layer.py tests/test_weight_format_layer.py
         tests/test_bench_mxfp4.py tests/experts/test_fp8.py tests/experts/test_triton.py)
fi
echo "== GPU tests: ${TESTS[*]} =="
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs -n 8 --dist loadfile "${TESTS[@]}" \
  > "$OUT/tests_gpu_check_$TAG.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests_gpu_check_$TAG.txt"
grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" "$OUT/tests_gpu_check_$TAG.txt" | tail -25
for f in bf16 fp8; do
  echo "== decode: qwen3 $f, small vs grouped (auto: small up to 8 tokens) =="
  timeout 60 python3 -m rocm_moe.cli bench decode --model qwen3-30b-a3b --format "$f" \
    --tokens 1 8 64 --experts-path small grouped --out "$OUT" \
    --name "decode_check_qwen3_${f}_$TAG" 2>&1 | grep "│" | tee "$OUT/decode_check_qwen3_${f}_$TAG.txt"
done
echo "== router alone and with its gate GEMM (qwen3, deepseek-v3) =="
timeout 60 python3 bench/router.py --sizes 1 8 64 128 --inner 20 --replays 200 --out "$OUT/router_$TAG.json" \
  2>&1 | tee "$OUT/router_$TAG.txt" | tail -12
echo "== bench experts: gpt-oss-20b, bf16 vs MXFP4 =="
timeout 60 python3 -m rocm_moe.cli bench experts --shapes gpt-oss-20b --formats bf16 mxfp4 \
  --sizes 1 16 256 4096 --out "$OUT" --name "experts_mxfp4_$TAG" 2>&1 | grep -v -i warn \
  | tee "$OUT/experts_mxfp4_$TAG.txt" | tail -14
