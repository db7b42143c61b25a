#!/usr/bin/env bash
# Issue 31: the block-FP8 grouped GEMM's launch variants on one GPU (H100 expected; ~3 min).
# Usage on the device machine, from the repository root:  bash bench/gpu_fp8_gemm.sh "$OUT"
#  0. bench/gluon_fp8_probe.py (<= 90 s): a dense block-scaled FP8 GEMM in Gluon with each K
#     step's promotion overlapped with the next MMA (and drained, as Triton does), checked
#     against a float32 reference, TFLOP/s beside torch._scaled_mm's: is the overlap worth a
#     grouped kernel? Writes $OUT/gluon_fp8_probe.txt; then bench/grouped_mm_probe.py (<= 120 s):
#     bf16 torch._grouped_mm (CUTLASS) GEMMs alone and as a whole experts pipeline beside the
#     Triton experts and the floor ($OUT/grouped_mm_probe.txt);
#  1. bench/tune_experts_fp8.py at Qwen3 4096 / 16384 tokens and DeepSeek-V3 8192 rows: every
#     candidate (<= 24) checked against the FP8 reference (WRONG rows fail the run) and timed:
#     us, TFLOP/s, time/floor, the torch._scaled_mm FP8 ceiling measured in the run; the best
#     per size again with precise=True (float32 out, < 1e-3); no candidate starts after 80 s.
#     Writes $OUT/triton_fp8_configs.json (to ship it: copy it to
#     rocm_moe/experts/triton_fp8_configs.json) and $OUT/tune_experts_fp8_variants.{txt,json};
#  2. rocm-moe bench experts-fp8 at the standard sizes with that table (ROCM_MOE_FP8_CONFIGS),
#     bf16 column off (time); its header prints the measured FP8 ceiling;
#  3. if time is left (< 150 s so far): the variants' GPU tests (tests/experts/
#     test_fp8_variants.py at the Qwen3 shape, both weight modes; the whole file: ~1-2 min).
# Exit status: non-zero if a candidate's correctness, the benchmark or a test failed.
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_fp8_gemm.txt"
status=0
SECONDS=0
echo "== 0. Gluon probe: async-wgmma promotion overlapped with the next MMA, vs drained =="
timeout 90 python3 bench/gluon_fp8_probe.py --sizes 4096 8192 2>&1 | grep -v -i warn \
  | tee "$OUT/gluon_fp8_probe.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || echo "gluon probe: failed or cut (not counted in the status)"
timeout 120 python3 bench/grouped_mm_probe.py 2>&1 | grep -v -i warn | tee "$OUT/grouped_mm_probe.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || echo "grouped_mm probe: failed or cut (not counted in the status)"
SECONDS=0
echo "== 1. sweep =="
python3 bench/tune_experts_fp8.py --table "$OUT/triton_fp8_configs.json" \
  --json "$OUT/tune_experts_fp8_variants.json" --budget-s 80 --rep-ms 20 2>&1 \
  | grep -v -i warn | tee "$OUT/tune_experts_fp8_variants.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: sweep (WRONG candidate or crash)"; status=1; }
echo "== 2. rocm-moe bench experts-fp8 with the swept table (${SECONDS} s so far) =="
if [ -s "$OUT/triton_fp8_configs.json" ]; then
  ROCM_MOE_FP8_CONFIGS="$OUT/triton_fp8_configs.json" python3 -m rocm_moe.cli bench \
    experts-fp8 --no-bf16 --out "$OUT" --name experts_fp8_variants 2>&1 | grep -v -i warn \
    | tee "$OUT/experts_fp8_variants.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: bench experts-fp8"; status=1; }
fi
if [ "$SECONDS" -lt 150 ]; then
  echo "== 3. FP8 GEMM variants' tests on the GPU (${SECONDS} s so far) =="
  python3 -m pytest -q -x -p no:cacheprovider -rs tests/experts/test_fp8_variants.py \
    -k "R1024 and matches or ceiling" 2>&1 | tee "$OUT/tests_fp8_variants.txt" | tail -4
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: variant tests"; status=1; }
else
  echo "== 3. skipped (${SECONDS} s): python3 -m pytest -q tests/experts/test_fp8_variants.py =="
fi
echo "== done in ${SECONDS} s, status ${status} =="
exit $status
