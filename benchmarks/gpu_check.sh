#!/usr/bin/env bash
# One device session (see README "## Performance"): golden replay on CUDA, eager and compiled,
# and the benchmark at the three shapes on CUDA. Output goes to $OUT.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
timeout 50 python3 benchmarks/golden_on_device.py --device cuda > "$OUT/golden_cuda.txt" 2>&1
timeout 80 python3 benchmarks/golden_on_device.py --device cuda --compiled > "$OUT/golden_cuda_compiled.txt" 2>&1
timeout 150 python3 benchmarks/bench_linear.py --device cuda --peers "torch.ao QAT" --reps 11 --warmup 3 \
  --json "$OUT/results_cuda.json" > "$OUT/bench_cuda.txt" 2>&1
tail -n 3 "$OUT"/*.txt
