# Sourced by the bench/gpu_session*.sh scripts (bash): OUT (arg 1, default bench/results) and TAG
# (arg 2, default h200) made, PYTHONPATH set to the tree, SECONDS and status zeroed, J (JSON_DIR,
# default OUT: the device returns only 8 files of $OUT, so give another dir) made, and
#   step NAME CAP COMMAND...  runs COMMAND under `timeout CAP`, its output (Python's warning
#                             lines dropped, pytest's summary kept) in $OUT/NAME_$TAG.txt and
#                             its last 14 lines on the console; a step that fails or is cut
#                             sets status=1 and the next step still runs.
#   shared_both_ways LEAST MOST DECODE...
#                             DeepSeek-V3's decode (the command DECODE...) with its shared
#                             expert through torch (ROCM_MOE_SHARED_STREAM_MAX_ROWS=0), then
#                             the streaming kernels (=64): each run while more than LEAST s
#                             of BUDGET_S (default 585) are left, capped at MOST s.
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

shared_both_ways() {  # least, most, decode command...
  local least=$1 most=$2 rows left
  shift 2
  for rows in 0 64; do
    left=$((${BUDGET_S:-585} - SECONDS))
    [ "$left" -gt "$least" ] && step "decode_dsv3_shared$rows" $(( left > most ? most : left )) \
      env ROCM_MOE_SHARED_STREAM_MAX_ROWS=$rows "$@" --name "decode_bf16_dsv3_shared${rows}_$TAG"
  done
}

finish() {
  echo "== done in ${SECONDS} s, status ${status} =="
  exit "$status"
}
