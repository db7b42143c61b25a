#!/usr/bin/env bash
# The whole pytest suite (pyproject's testpaths: tests/) on a GPU machine with that machine's own
# torch and Triton (issue 27: 0 failures; a test that needs a newer Triton skips with the reason).
# Usage on the device machine, from the repository root:  bash bench/gpu_tests.sh "$OUT" [tag]
# Writes the machine, the suite's output, its skip reasons and its slowest tests to
# $OUT/tests_gpu_<tag>.txt (tag default h100); prints the summary line; exits with pytest's code.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
FILE="$OUT/tests_gpu_$TAG.txt"
machine_info "$FILE"
echo "== python3 -m pytest (whole suite, this machine's torch) ==" | tee -a "$FILE"
python3 -m pytest -q -p no:cacheprovider -rs --durations=15 >> "$FILE" 2>&1
rc=$?
grep -E "^(FAILED|ERROR) " "$FILE"
tail -n 1 "$FILE"
exit "$rc"
