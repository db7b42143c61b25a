#!/usr/bin/env bash
# Everything the 2-GPU acceptance needs, in one device call (see bench/results/README.md).
# Usage on the device machine, from the repository root:  bash bench/gpu_2x.sh "$OUT"
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
# NVLink multicast stays off on the lent machines (device docs); harmless elsewhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
nvidia-smi topo -m 2>/dev/null | head -4
echo "== tests (gpu-marked and all) =="
python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/tests_2xh200.txt" | tail -4
echo "== sanity, 2 ranks, NCCL =="
python3 -m rocm_moe.cli sanity --world-size 2 2>&1 | tee "$OUT/sanity_2xh200.txt" | tail -3
echo "== run, 2 ranks, NCCL, Qwen3-30B-A3B shape =="
python3 -m rocm_moe.cli run --world-size 2 --tokens 4096 --json "$OUT/run_2xh200.json" 2>&1 | tee "$OUT/run_2xh200.txt"
echo "== comm benchmark, 2 ranks =="
python3 -m rocm_moe.cli bench comm --world-size 2 --out "$OUT" --name comm_2xh200 2>&1 | tee "$OUT/comm_2xh200.txt"
echo "== where dispatch time goes (rank 0) =="
python3 bench/profile_comm.py 128 4096 2>&1 | grep -v -i warn | tee "$OUT/profile_2xh200.txt" | grep "^T="
