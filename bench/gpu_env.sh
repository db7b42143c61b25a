# Sourced by bench/gpu_*.sh: what every GPU run here needs (NVLink multicast off, as the device
# machines require; the package importable from the tree) and `machine_info FILE`.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# Date, GPUs, torch / Triton / NCCL versions and the GPU topology, on the terminal and in FILE.
# (No commit: the device machines' copy of .git can be older than the tree they run.)
machine_info() {
  { date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
    nvidia-smi topo -m 2>/dev/null | head -6
  } | tee "$1"
}
