#!/usr/bin/env bash
# Everything the GPU machine is for, in one call (~6-8 minutes on an H200):
#   1. gpu_check.sh: tier-2 parity tests (float32 on CUDA vs the float64 reference) and the
#      layer benchmark on CUDA;
#   2. pipeline_shapes.py: the whole engine on LLaMA-7B (2 blocks) and LLaMA-2-70B
#      (1 block) shapes with 128 x 2048 calibration tokens in fp16: time per block, peak
#      device memory.
# Results: $OUT/results.tgz (all logs and tables) and $OUT/summary.txt.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FINAL="${OUT:-/tmp/out}"
WORK="$(mktemp -d)"
export PYTHONUNBUFFERED=1

OUT="$WORK/check" bash "$REPO/benchmarks/gpu_check.sh"
rc_check=$?

PKG="$(mktemp -d)"; mkdir -p "$PKG/admm_prune"
ln -s "$REPO/reference" "$PKG/admm_prune/reference"; ln -s "$REPO/gpu" "$PKG/admm_prune/gpu"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p "$WORK/shapes"
timeout 200 python "$REPO/benchmarks/pipeline_shapes.py" --device cuda --shapes llama7b --blocks 2 \
    --out "$WORK/shapes/llama7b" 2>&1 | tee "$WORK/shapes/llama7b.log"
rc_7b=${PIPESTATUS[0]}
timeout 220 python "$REPO/benchmarks/pipeline_shapes.py" --device cuda --shapes llama2-70b --blocks 1 \
    --out "$WORK/shapes/llama2-70b" 2>&1 | tee "$WORK/shapes/llama2-70b.log"
rc_70b=${PIPESTATUS[0]}

mkdir -p "$FINAL"
{ echo "gpu_check rc=$rc_check llama7b rc=$rc_7b llama2-70b rc=$rc_70b"; cat "$WORK/check/summary.txt" 2>/dev/null
  cat "$WORK/shapes/"*.md 2>/dev/null; } | tee "$FINAL/summary.txt"
tar czf "$FINAL/results.tgz" -C "$WORK" .
