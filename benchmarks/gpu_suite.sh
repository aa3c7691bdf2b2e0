#!/usr/bin/env bash
# Issue #13's GPU measurements in one run, for a machine with a CUDA GPU and this checkout's
# virtual environment (with torch's CUDA build): the adapter's step overhead on the full-size
# PixArt-Σ transformer at 512 and 1024 px in bfloat16, then the service's throughput on the demo
# model. Results land in benchmarks/results/*_cuda*.json; record them in benchmarks/RESULTS.md.
#   bash benchmarks/gpu_suite.sh            # about 10 minutes on one GPU
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
out=benchmarks/results
for px in 512 1024; do
  python benchmarks/adapter_overhead.py --device cuda --resolution "$px" --runs 25 \
    --output "$out/adapter_overhead_cuda_${px}.json"
done
python benchmarks/service_throughput.py --device cuda --output "$out/service_throughput_cuda.json"
