#!/usr/bin/env bash
# Everything that needs a GPU, for a bare GPU machine with no network, most valuable first, each part
# under its own time limit so that one that hangs costs only itself:
#   bench: the step-time benchmark in fp32 and bf16 (paper-cnn, batch 50/256/1024 and the host-bound
#          row), every rule eager and replayed from a CUDA graph, EKDAA's error map also unfused and
#          from z alone (stderr with Dynamo's recompiles beside each JSON);
#   tests: the CUDA tests;
#   diag:  graph against eager (benchmarks/graph_vs_eager.py): rounding or a real difference.
# Usage: benchmarks/gpu_check.sh OUTDIR [PART ...]   (default: bench tests diag)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [bench] [tests] [diag]}
shift
parts=" ${*:-bench tests diag} "
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'tf32 cudnn', torch.backends.cudnn.allow_tf32)" | tee -a "$out/gpu.txt"
if [[ $parts == *" bench "* ]]; then
  for amp in none bf16; do
    name=$([ "$amp" = none ] && echo fp32 || echo bf16)
    TORCH_LOGS=recompiles timeout 150 python3 -m ekdaa.bench --device cuda --amp "$amp" \
        --rules ekdaa,fa,dfa,kolen-pollack --batch-sizes 50,256,1024 \
        --steps 20 --repeats 5 --cuda-graph --unfused --json > "$out/bench-$name.json" 2> "$out/bench-$name.err" \
      && python3 -m ekdaa.bench --table "$out/bench-$name.json" | tee "$out/bench-$name.md" \
      || tail -30 "$out/bench-$name.err"
  done
fi
if [[ $parts == *" tests "* ]]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_graphs.py 2>&1 | tail -40 \
    | tee "$out/tests.log"
fi
if [[ $parts == *" diag "* ]]; then
  timeout 150 python3 benchmarks/graph_vs_eager.py --rules sign-symmetry,ekdaa 2>&1 | tee "$out/graph_vs_eager.txt"
fi
