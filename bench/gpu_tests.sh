#!/usr/bin/env bash
# The whole pytest suite (pyproject's testpaths: tests/) on a GPU machine with that machine's own
# torch and Triton (issue 27: 0 failures; a test that needs a newer Triton skips with the reason).
# Usage on the device machine, from the repository root:
#   bash bench/gpu_tests.sh "$OUT" [tag] [K/N]
# Writes the machine, the suite's output, its skip reasons and its slowest tests to
# $OUT/tests_gpu_<tag>.txt (tag default h100); prints the summary line; exits with pytest's code.
# K/N runs the K-th of N parts of the suite (test files dealt round-robin in sorted order) into
# $OUT/tests_gpu_<tag>_<K>of<N>.txt: on one H100 the whole suite took more than the device's
# 600 s per call on 2026-12-06 (it was 515 s without the tests added that day), so run it as
# "1/2" and "2/2" in two calls.
# XDIST=N (environment): N pytest-xdist workers, files kept whole per worker (--dist loadfile),
# (the device image has pytest-xdist; else from the wheels in .whl/, carried: no network);
# every test that fails there is then rerun alone, serially, and both results are written.
# LIMIT=S (environment): stop pytest with SIGINT after S seconds (it still prints its summary of
# what ran) and list every test's result as it finishes (-v), so a run cut short by the
# device's time still says which tests passed and failed, with every test's time over 2 s (for
# ordering the files next time); no serial rerun then. The suite is
# collected first, so a cut run also writes the ids it did not reach to
# $OUT/tests_gpu_<tag>[_KofN]_unreached.txt and to /tmp/gpu_tests_unreached.txt (kept on the
# device machine while it stays warm, for the next call).
# ORDER_FROM=FILE (environment, with XDIST, whole suite): an earlier run's output whose test
# times order the files, slowest first (default: the last committed H100 run).
# ONLY=FILE (environment): run just the test ids listed in FILE, one a line (e.g.
# ONLY=/tmp/gpu_tests_unreached.txt in a call chained to a cut one), spread test by test
# (--dist load) under XDIST.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
PART=${3:-}
mkdir -p "$OUT"
source bench/gpu_env.sh
FILE="$OUT/tests_gpu_$TAG.txt"
TARGETS=()
if [ -n "$PART" ]; then
  K=${PART%/*}
  N=${PART#*/}
  FILE="$OUT/tests_gpu_${TAG}_${K}of${N}.txt"
  mapfile -t ALL < <(find tests -name 'test_*.py' | sort)
  for i in "${!ALL[@]}"; do
    if [ $(( i % N )) -eq $(( K - 1 )) ]; then TARGETS+=("${ALL[$i]}"); fi
  done
fi
if [ -n "${ONLY:-}" ]; then
  [ -f "$ONLY" ] || { echo "ONLY=$ONLY: no such file (a cold machine lost /tmp)"; exit 2; }
  mapfile -t TARGETS < <(grep -v '^[[:space:]]*$' "$ONLY")
  if [ "${#TARGETS[@]}" -eq 0 ]; then echo "no test ids in $ONLY: nothing to run"; exit 0; fi
fi
WHOLE=""  # the whole suite on xdist workers: its slowest files first (by the times of
# ORDER_FROM, an earlier run's output), so a long file no longer starts last and holds the end
if [ -z "$PART" ] && [ -z "${ONLY:-}" ] && [ -n "${XDIST:-}" ]; then
  WHOLE=1
  mapfile -t TARGETS < <(python3 bench/pytest_log.py slowest-first \
    "${ORDER_FROM:-bench/results/tests_gpu_79f34e3_h100.txt}")
fi
DIST=loadfile
[ -n "${ONLY:-}" ] && DIST=load
XARGS=()
if [ -n "${XDIST:-}" ]; then
  if python3 -c "import xdist" 2>/dev/null; then XARGS=(-n "$XDIST" --dist "$DIST")
  elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/execnet-*.whl .whl/pytest_xdist-*.whl
  then export PYTHONPATH=/tmp/site:$PYTHONPATH; XARGS=(-n "$XDIST" --dist "$DIST")
  else echo "pytest-xdist did not install: running serially" | tee -a "$FILE"
  fi
fi
machine_info "$FILE"
SHOWN="${TARGETS[*]}"
[ -n "${ONLY:-}" ] && SHOWN="the ${#TARGETS[@]} ids in $ONLY"
[ -n "$WHOLE" ] && SHOWN="the ${#TARGETS[@]} files of tests/, slowest first: ${TARGETS[*]:0:10} ..."
echo "== python3 -m pytest ${XARGS[*]} ${PART:+part $PART: }(this machine's torch) $SHOWN ==" \
  | tee -a "$FILE"
if [ -n "${LIMIT:-}" ]; then
  COLLECTED=$(mktemp)
  python3 -m pytest --collect-only -q -p no:cacheprovider "${TARGETS[@]}" > "$COLLECTED" 2>&1 \
    || echo "collection: exit $? (its errors: $COLLECTED)" | tee -a "$FILE"
  timeout -s INT -k 30 "$LIMIT" python3 -m pytest -v -p no:cacheprovider -rfEs --durations=0 \
    --durations-min=2 \
    "${XARGS[@]}" "${TARGETS[@]}" >> "$FILE" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR) |\] (FAILED|ERROR) " "$FILE" | sort -u
  echo "passed so far: $(grep -cE '\] PASSED |^tests/.* PASSED' "$FILE"), exit $rc" \
    "(124 or 130: cut at ${LIMIT} s)"
  tail -n 1 "$FILE"
  UNREACHED="${FILE%.txt}_unreached.txt"
  python3 bench/pytest_log.py unreached "$COLLECTED" "$FILE" > "$UNREACHED"
  cp "$UNREACHED" /tmp/gpu_tests_unreached.txt
  echo "unreached: $(grep -c . "$UNREACHED") of $(grep -c '::' "$COLLECTED") collected" \
    "(ONLY=/tmp/gpu_tests_unreached.txt runs them)" | tee -a "$FILE"
  exit "$rc"
fi
python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15 "${XARGS[@]}" "${TARGETS[@]}" \
  >> "$FILE" 2>&1
rc=$?
grep -E "^(FAILED|ERROR) " "$FILE"
tail -n 1 "$FILE"
if [ -n "${XDIST:-}" ] && [ "$rc" -ne 0 ]; then
  mapfile -t FAILED < <(grep -E "^(FAILED|ERROR) " "$FILE" | awk '{print $2}' | sort -u)
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "== rerun alone, serially: ${#FAILED[@]} test(s) that failed under xdist ==" \
      | tee -a "$FILE"
    python3 -m pytest -q -p no:cacheprovider -rs "${FAILED[@]}" >> "$FILE" 2>&1
    rc=$?
    tail -n 1 "$FILE"
  fi
fi
exit "$rc"
