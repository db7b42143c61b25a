#!/usr/bin/env bash
# The symm backend's acceptance in one device call on 4 GPUs (see bench/results/README.md):
# its GPU tests, the comm benchmark (torch and symm beside the raw all_to_all_single and the
# p2p copy ceiling) and the whole-layer benchmark at W = 4, then both benchmarks at W = 2 on
# GPUs 0 and 1. Usage on the device machine, from the repository root:
#   bash bench/gpu_4x.sh "$OUT" [name suffix, default 4xh100]
set -uo pipefail
OUT=${1:-bench/results}
SUF=${2:-h100}
ITERS=${ITERS:-30}  # timed iterations per case
W2_LAYER=${W2_LAYER:-1}  # 0: skip the W = 2 layer benchmark
R=/tmp/r  # everything comes back as $OUT/results.tgz, rewritten after each step
mkdir -p "$R" "$OUT"
save() { tar -C /tmp -czf "$OUT/results.tgz" r; }
# NVLink multicast stays off on the lent machines (device docs); harmless elsewhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ date -u; git rev-parse --short HEAD 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvidia-smi topo -m 2>/dev/null | head -6; } | tee "$R/machine_4x$SUF.txt"
echo "== symm GPU tests =="
python3 -m pytest -q -p no:cacheprovider -rs tests/comm/test_symm.py tests/test_weighting_triton.py 2>&1 \
  | tee "$R/tests_symm_4x$SUF.txt" | tail -3; save
echo "== comm, W=4 =="
python3 -m rocm_moe.cli bench comm --iters "$ITERS" --out "$R" --name "comm_4x$SUF" 2>&1 | grep -v -i warn | tee "$R/comm_4x$SUF.txt"; save
echo "== layer, W=4 =="
python3 -m rocm_moe.cli bench layer --iters "$ITERS" --out "$R" --name "layer_4x$SUF" 2>&1 | grep -v -i warn | tee "$R/layer_4x$SUF.txt"; save
echo "== comm and layer, W=2 (GPUs 0, 1) =="
CUDA_VISIBLE_DEVICES=0,1 python3 -m rocm_moe.cli bench comm --world-size 2 --iters "$ITERS" --out "$R" --name "comm_2x$SUF" 2>&1 | grep -v -i warn | tee "$R/comm_2x$SUF.txt" | tail -12; save
[ "$W2_LAYER" = 1 ] && CUDA_VISIBLE_DEVICES=0,1 python3 -m rocm_moe.cli bench layer --world-size 2 --iters "$ITERS" --out "$R" --name "layer_2x$SUF" 2>&1 | grep -v -i warn | tee "$R/layer_2x$SUF.txt" | tail -12
save
