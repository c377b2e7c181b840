#!/usr/bin/env bash
# One device session: golden replay on CUDA (eager and compiled kernels), the CUDA tests, the
# step benchmark (eager, torch.compile default and reduce-overhead, torch.ao) with a host-sync
# check, and bench_linear at the three shapes. Output goes to $OUT.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
timeout 60 python3 benchmarks/golden_on_device.py --device cuda > "$OUT/golden_cuda.txt" 2>&1
timeout 90 python3 benchmarks/golden_on_device.py --device cuda --compiled > "$OUT/golden_cuda_compiled.txt" 2>&1
timeout 120 python3 benchmarks/cuda_sync_check.py > "$OUT/sync_cuda.txt" 2>&1
timeout 150 python3 benchmarks/bench_cuda_steps.py --json "$OUT/results_cuda_steps.json" > "$OUT/steps_cuda.txt" 2>&1
timeout 90 python3 -m pytest -q -p no:cacheprovider -k "cuda or autocast" tests/test_hostile_inputs.py \
  tests/test_training_stack.py > "$OUT/pytest_cuda.txt" 2>&1
tail -n 4 "$OUT"/*.txt
