#!/usr/bin/env bash
# Issue 27's one-GPU acceptance of the shared dispatcher in one device call: the tests of the
# model stack, chunking, symm and graphs on this GPU, then `rocm-moe bench model` (8 Qwen3-shape
# layers on one symm dispatcher in one CUDA graph vs one layer alone).
# Usage on the device machine, from the repository root:  bash bench/gpu_model.sh "$OUT" [tag]
set -uo pipefail
OUT=${1:-bench/results}
TAG=${2:-h100}
mkdir -p "$OUT"
source bench/gpu_env.sh
machine_info "$OUT/machine_model_$TAG.txt"
echo "== tests: model stack, chunks, graphs, symm, invariant (this GPU) =="
python3 -m pytest -q -p no:cacheprovider -rs tests/test_model.py tests/test_chunks.py \
  tests/test_graphs.py tests/comm/test_symm.py tests/test_invariant.py 2>&1 \
  | tee "$OUT/tests_model_$TAG.txt" | tail -6
echo "== bench model: 8 layers, one symm dispatcher, Triton experts =="
python3 -m rocm_moe.cli bench model --layers 8 --tokens 1 8 128 --max-tokens-per-rank 128 \
  --out "$OUT" --name "model_qwen3-30b-a3b_W1_$TAG" 2>&1 | tee "$OUT/model_qwen3-30b-a3b_W1_$TAG.txt"
echo "== bench model: the same stack with buffers for 4096 tokens per rank =="
python3 -m rocm_moe.cli bench model --layers 8 --tokens 1 8 128 --max-tokens-per-rank 4096 \
  --out "$OUT" --name "model_qwen3-30b-a3b_W1_cap4096_$TAG" 2>&1 \
  | tee "$OUT/model_qwen3-30b-a3b_W1_cap4096_$TAG.txt"
