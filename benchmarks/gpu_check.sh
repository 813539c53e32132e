#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a bare GPU machine with no network:
# the CUDA tests, then the step-time benchmark in fp32 and bf16 at several batch sizes.
# Usage: benchmarks/gpu_check.sh OUTDIR   (writes gpu.txt, tests.log, bench-fp32.json, bench-bf16.json)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_rules.py 2>&1 | tee "$out/tests.log"
for amp in none bf16; do
  name=$([ "$amp" = none ] && echo fp32 || echo bf16)
  python3 -m ekdaa.bench --device cuda --amp "$amp" --batch-sizes 50,256,1024 --steps 20 --repeats 5 --json \
    | tee "$out/bench-$name.json"
done
