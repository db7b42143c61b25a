#!/usr/bin/env bash
# Issue 33 on one GPU in one device call (the steps' limits add up to 555 s: under the 600 s of
# a device call; a step cut by its limit still leaves the others' files):
#   1. bench/gpu_router_dsv3.sh: the gate + router plans (the candidates for DeepSeek-V3's
#      128-token miss; fills _gate_triton.TUNED)                                   <= 155 s
#   2. rocm-moe bench decode, Qwen3-30B-A3B bf16 and block-FP8, 1 / 8 / 64 tokens, with the
#      Triton gate (--fused-gate all) and 16 token batches per graph (--batches: the experts'
#      weights read from HBM, not left in L2 by the call before): the layer targets (<= 40 us
#      bf16, <= 25 us FP8 at one token; layer / experts <= 1.05 from 8 tokens)  <= 80 s each
#      FP8 again with the streaming experts' PDL launches (gate/up behind the router, down behind
#      gate/up: ROCM_MOE_FP8_SMALL_CONFIG='{"PDL": true}') and the kernel table     <= 80 s
#   3. the same for DeepSeek-V3 bf16 (all 256 experts on the GPU), 1 / 8 / 128 tokens <= 80 s
#   4. rocm-moe bench decode --comm symm at capacity 128 vs 16384 with the kernel table (copies
#      and memsets listed too): the capacity ratio (<= 1.1)                           <= 80 s
# Usage on the device machine, from the repository root:
#   bash bench/gpu_decode_all.sh DIR [tag]      (tag default h100)
# The device returns at most 8 files of $OUT: give a scratch DIR and tar it into $OUT, e.g.
#   bash bench/gpu_decode_all.sh /tmp/o h100; tar czf "$OUT/decode_all.tgz" -C /tmp/o .
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
TAG=${2:-h100}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
status=0

decode() {  # name, limit, then rocm-moe bench decode's flags
  local name=$1 limit=$2
  shift 2
  echo "== $name (${SECONDS} s) =="
  timeout "$limit" python3 -m rocm_moe.cli bench decode "$@" --out "$OUT" \
    --name "${name}_$TAG" 2>&1 | grep -v -i warn | tee "$OUT/${name}_$TAG.txt" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

echo "== 1. router plans (${SECONDS} s) =="
timeout 155 bash bench/gpu_router_dsv3.sh "$OUT" "$TAG" | tail -16 || status=1
decode decode_gate_qwen3_bf16 80 --model qwen3-30b-a3b --tokens 1 8 64 --fused-gate all \
  --batches 16
decode decode_gate_qwen3_fp8 80 --model qwen3-30b-a3b --format fp8 --tokens 1 8 64 \
  --fused-gate all --batches 16
ROCM_MOE_FP8_SMALL_CONFIG='{"PDL": true}' decode decode_gate_qwen3_fp8_pdl 80 \
  --model qwen3-30b-a3b --format fp8 --tokens 1 8 64 --fused-gate all --batches 16 --kernel-table
decode decode_gate_dsv3_bf16 80 --model deepseek-v3 --tokens 1 8 128 --fused-gate all \
  --batches 16
decode decode_symm_kernels 80 --model qwen3-30b-a3b --comm symm --max-tokens-per-rank 128 16384 \
  --tokens 1 8 --fused-gate all --kernel-table
echo "== done in ${SECONDS} s, status ${status} =="
exit $status
