#!/usr/bin/env bash
# Issue 16's acceptance in one device call on N (even) GPUs of one host, N = 4 for the issue: the
# whole-layer benchmark on 1 node x N GPUs (torch and symm) and on 2 emulated nodes x N/2 GPUs
# (two torchrun launchers,
# NCCL_HOSTID per node: NCCL carries inter-node traffic over its socket transport, intra-node
# over NVLink; symm is refused across nodes), DeepSeek-V3 and Qwen3-30B-A3B shapes; then
# `rocm-moe run` and `sanity` under the emulated two-node torchrun. See notes/multinode.md.
#   bash bench/gpu_multinode.sh "$OUT" [suffix, default 4xh100]
# (on 2 GPUs: 1 x 2 and 2 x 1; names keep the layout, e.g. layer_qwen3-30b-a3b_2x1_2xh100)
set -uo pipefail
OUT=${1:-bench/results}
SUF=${2:-4xh100}
ITERS=${ITERS:-15}
STEP_S=${STEP_S:-170}  # each step's own time limit
R=/tmp/mn
mkdir -p "$R" "$OUT"
save() { tar -C /tmp -czf "$OUT/multinode.tgz" mn; }
source bench/gpu_env.sh
machine_info "$R/machine_$SUF.txt"

NG=$(nvidia-smi -L | wc -l)
PER=$((NG / 2))  # GPUs per emulated node
L1="1x$NG" L2="2x$PER"
# Two emulated nodes of PER GPUs: node n gets GPUs n*PER .. n*PER+PER-1 and its own NCCL_HOSTID.
two_nodes() {  # two_nodes NAME PORT rocm-moe args...
  local name=$1 port=$2; shift 2
  for n in 0 1; do
    CUDA_VISIBLE_DEVICES=$(seq -s, $((n * PER)) $((n * PER + PER - 1))) NCCL_HOSTID=emunode$n \
      NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT \
      timeout "$STEP_S" python3 -m torch.distributed.run --nnodes 2 --nproc-per-node "$PER" \
      --node-rank $n --master-addr 127.0.0.1 --master-port "$port" -m rocm_moe.cli "$@" \
      > "$R/${name}_node$n.log" 2>&1 &
  done
  wait
  grep -v -E "NCCL INFO|^\[rank|Warning|warn" "$R/${name}_node0.log" | tail -40
  echo "NCCL channels via NET (inter-node) / via P2P or SHM (intra-node), node 0's log:" \
    "$(grep -c 'via NET' "$R/${name}_node0.log")" / \
    "$(grep -c -E 'via P2P|via SHM' "$R/${name}_node0.log")"
}

if [ -z "${LAYER_ONLY:-}" ]; then  # LAYER_ONLY=1: the layer benchmarks alone
echo "== tests touched by the launcher change (symm on GPUs) =="
timeout "$STEP_S" python3 -m pytest -q -p no:cacheprovider -x tests/comm/test_symm.py 2>&1 | tail -2 | tee "$R/tests_$SUF.txt"
echo "== run and sanity under torchrun --nnodes 2 (emulated) =="
two_nodes "run_$L2" 29612 run --tokens 512 --iters 5 | tee "$R/run_${L2}_$SUF.txt"
two_nodes "sanity_$L2" 29613 sanity | tee "$R/sanity_${L2}_$SUF.txt"
save
fi
for model in qwen3-30b-a3b deepseek-v3; do
  echo "== 1 node x $NG: $model =="
  timeout "$STEP_S" python3 -m rocm_moe.cli bench layer --model $model --world-size "$NG" \
    --comm torch symm --skew uniform zipf --tokens 1 128 4096 16384 --iters "$ITERS" \
    --out "$R" --name "layer_${model}_${L1}_$SUF" 2>&1 | grep -v -i warn \
    | tee "$R/layer_${model}_${L1}_$SUF.txt" | tail -30
  save
  echo "== 2 emulated nodes x $PER: $model =="
  two_nodes "layer_${model}_$L2" 29611 bench layer --model $model --comm torch symm \
    --skew uniform --tokens 1 128 4096 --iters "$ITERS" --out "$R" \
    --name "layer_${model}_${L2}_$SUF" | tee "$R/layer_${model}_${L2}_$SUF.txt"
  save
done
