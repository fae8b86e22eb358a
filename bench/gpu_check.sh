#!/usr/bin/env bash
# One-shot GPU benchmark on a lent machine that has PyTorch but not torchtune (its wheels travel in .whl/):
# Llama-3.2-3B shape, bf16, packed 2048. Each argument is "STACK VARIANT" (see python -m bench.run --help);
# results as JSON under $OUT. BENCHMARKS.md has the numbers it produced.
#   bash bench/gpu_check.sh "ours default" "torchtune default" "ours ac+offload"
set -u
out=${OUT:-/tmp/bench-out}
per_run=${PER_RUN_TIMEOUT:-165}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, torchtune, torchao, datasets; print(torch.__version__, torchtune.__version__, torchao.__version__, datasets.__version__)"
python3 -m lora_tools.tiny_assets --out assets/tiny
python3 -c "from bench.run import build_model; build_model('3b', 'cuda')"
for spec in "$@"; do
  set -- $spec
  name="$1-${2//+/_}"
  timeout $((per_run + 10)) python3 -m bench.run --device cuda --stacks "$1" --variants "$2" --steps 15 \
    --timeout "$per_run" --json "$out/$name.json" | grep '^{'
  tail -c 600 outputs/bench/"$1-$2"-0/console.txt > "$out/console-$name.txt" 2>/dev/null
done
