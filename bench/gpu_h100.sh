#!/usr/bin/env bash
# The experts acceptance (issue 4) in one device call on one GPU (see bench/results/README.md).
# Usage on the device machine, from the repository root:  bash bench/gpu_h100.sh "$OUT" [tune]
# With "tune", first re-tunes the launch-config table for this GPU (about 7 minutes on an H100)
# and benchmarks with it; the new table comes back as $OUT/triton_configs.json.
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${2:-}" = tune ]; then
  echo "== tune launch configs =="
  python3 bench/tune_experts.py "$OUT/triton_configs.json" \
    --base rocm_moe/experts/triton_configs.json > "$OUT/tune_experts_h100.txt" 2>&1
  cp "$OUT/triton_configs.json" rocm_moe/experts/triton_configs.json
fi
echo "== layout and Triton experts tests, compiled =="
python3 -m pytest -q -p no:cacheprovider tests/test_layout.py tests/experts 2>&1 \
  | tee "$OUT/tests_experts_h100.txt" | tail -3
echo "== sanity with the Triton experts =="
python3 -m rocm_moe.cli sanity --experts triton 2>&1 | tee "$OUT/sanity_experts_h100.txt" | tail -3
echo "== experts benchmark =="
python3 -m rocm_moe.cli bench experts --out "$OUT" --name experts_h100 2>&1 \
  | tee "$OUT/experts_h100.txt"
echo "== per-kernel profile =="
python3 bench/profile_experts.py 2>&1 | grep -v -i warn | tee "$OUT/profile_experts_h100.txt" \
  | grep "graph replay"
