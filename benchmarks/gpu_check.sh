#!/usr/bin/env bash
# One GPU session's checks, in the order they matter (issue: the fused kernels on a real GPU).
# Budget: <= 8 minutes on one H200. Writes everything under ${OUT:-benchmarks/results/gpu}.
#
#   prepare on the CPU machine (the GPU machine reaches no package registry):
#     pip install --target .device-deps pytest==9.2.0 hypothesis==6.170.17
#   then, on the GPU machine (device tool, carry .device-deps):
#     bash benchmarks/gpu_check.sh
#
# Steps: 1. versions (torch, triton, nvcc, GPU); 2. correctness: tests/test_fused.py,
# tests/test_parity.py and tests/test_oracles.py on CUDA, the CUDA C++ extension built and tested;
# 3. speed: benchmarks/step_throughput.py (copy, torch fused SGD/AdamW, torch Muon and every deepopt
# implementation chosen explicitly); 4. HOPE's gpu preset for 200 steps: tokens/s of both models.
# Each step has its own time limit so that one hang cannot eat the session.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.device-deps${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE=ci
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }

log "versions"
{
  python -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  python -c "import triton; print('triton', triton.__version__)" 2>&1
  python -c "import pytest, hypothesis; print('pytest', pytest.__version__, 'hypothesis', hypothesis.__version__)" 2>&1
  (which nvcc && nvcc --version | tail -1) 2>&1 || echo "nvcc: not found"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -2
} | tee "$OUT/versions.txt"

log "correctness: fused kernels, parity and oracles on CUDA"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_parity.py tests/test_oracles.py \
  --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tail -25 | tee "$OUT/pytest_cuda.txt"

log "speed: step throughput (fused=True and the CUDA backend chosen explicitly)"
timeout 180 python benchmarks/step_throughput.py --out "$OUT/step_throughput.json" --rep 50 2>&1 | tail -40 \
  | tee "$OUT/step_throughput.txt"

log "HOPE gpu preset"
timeout 100 python examples/hope/train.py --preset gpu --steps 200 --out "$OUT/hope" 2>&1 | tail -8 | tee "$OUT/hope.txt"
log "done"
