#!/usr/bin/env bash
# One-shot GPU benchmark on a lent machine that has PyTorch but not torchtune (its wheels travel in .whl/):
# Llama-3.2-3B shape, bf16, packed 2048; this recipe with and without activation checkpointing, and
# torchtune's own recipe. Results as JSON under $OUT. See BENCHMARKS.md for the numbers it produced.
set -u
out=${OUT:-/tmp/bench-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, torchtune, torchao, datasets; print(torch.__version__, torchtune.__version__, torchao.__version__, datasets.__version__)"
python3 -m lora_tools.tiny_assets --out assets/tiny
python3 -c "from bench.run import build_model; build_model('3b', 'cuda')" && ls -la assets/bench-3b
for spec in "ours default" "ours ac" "torchtune default"; do
  set -- $spec
  timeout 175 python3 -m bench.run --device cuda --stacks "$1" --variants "$2" --steps 15 --timeout 165 \
    --json "$out/$1-$2.json"
  tail -n 4 outputs/bench/"$1-$2"-0/console.txt > "$out/console-$1-$2.txt" 2>/dev/null
done
