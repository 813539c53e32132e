#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a bare GPU machine with no network:
# the CUDA tests, then the step-time benchmark in fp32 and bf16 at batch 50/256/1024, every rule,
# eager and replayed from a CUDA graph, plus EKDAA's error map fused, unfused and from z alone, and the
# whole model compiled. (The paper suite's CIFAR-10 runs need the dataset, which cannot travel to a bare
# GPU machine with the 64 MiB it carries: run them where the data is.)
# Usage: benchmarks/gpu_check.sh OUTDIR   (writes gpu.txt, tests.log, bench-*.json and bench-*.md)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_rules.py 2>&1 | tee "$out/tests.log"
# eager first: a failure of the (newer) graph rows must not cost the eager tables
for amp in none bf16; do
  name=$([ "$amp" = none ] && echo fp32 || echo bf16)
  for mode in eager graph; do
    flags=$([ "$mode" = graph ] && echo --cuda-graph || true)
    python3 -m ekdaa.bench --device cuda --amp "$amp" --batch-sizes 50,256,1024 --steps 20 --repeats 5 $flags \
      --json > "$out/bench-$name-$mode.json" \
      && python3 -m ekdaa.bench --table "$out/bench-$name-$mode.json" | tee "$out/bench-$name-$mode.md"
  done
  python3 -m ekdaa.bench --device cuda --amp "$amp" --rules ekdaa,ekdaa:error_map_from=output --unfused --compile \
    --batch-sizes 50,256,1024 --steps 20 --repeats 5 --json > "$out/bench-$name-modes.json" \
    && python3 -m ekdaa.bench --table "$out/bench-$name-modes.json" | tee "$out/bench-$name-modes.md"
done
