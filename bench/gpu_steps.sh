# Sourced by the bench/gpu_session*.sh scripts (bash): OUT (arg 1, default bench/results) and TAG
# (arg 2, default h200) made, PYTHONPATH set to the tree, SECONDS and status zeroed, J (JSON_DIR,
# default OUT: the device returns only 8 files of $OUT, so give another dir) made, and
#   step NAME CAP COMMAND...  runs COMMAND under `timeout CAP`, its output (Python's warning
#                             lines dropped, pytest's summary kept) in $OUT/NAME_$TAG.txt and
#                             its last 14 lines on the console; a step that fails or is cut
#                             sets status=1 and the next step still runs.
# A script ends with `finish`: the time taken and the status, and exits with it.
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h200}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
status=0
J=${JSON_DIR:-$OUT}
mkdir -p "$J"

step() {  # name, cap, command...
  local name=$1 cap=$2
  shift 2
  echo "== $name (${SECONDS} s, cap ${cap} s) =="
  timeout "$cap" "$@" 2>&1 | grep -v -E '[A-Za-z]*Warning: |warnings\.warn|warn_once' |
    tee "$OUT/${name}_$TAG.txt" | tail -14
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "STEP $name FAILED OR CUT"; status=1; }
}

finish() {
  echo "== done in ${SECONDS} s, status ${status} =="
  exit "$status"
}
