#!/usr/bin/env bash
# One prepared GPU check (issue 7). On a CUDA machine:
#   * exercises the CUDA-buffer layer (pinned host <-> device copies through cuda-python);
#   * with TensorRT: exports, builds and parity-checks engines for sd1-tiny and the SD1.5 architecture
#     (random weights), then times each stage (text encoder, UNet step, VAE decode, end to end) against
#     diffusers fp16 on the same GPU and compares images by PSNR;
#   * without TensorRT but with PyTorch CUDA: still runs the diffusers fp16 reference timing.
# Results: $OUT/gpu_check.json (default build/gpu_check). Options pass through to gpu_check.py
# (--skip-sd15, --steps N, --runs N). Exit status is non-zero only when a check that could run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || echo "nvidia-smi: not found"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
