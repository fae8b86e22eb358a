#!/usr/bin/env bash
# One-shot GPU benchmark on a lent machine that has PyTorch but not torchtune (its wheels travel in .whl/):
# Llama-3.2-3B shape, bf16, packed 2048. Each argument is "STACK VARIANT" (see python -m bench.run --help):
#   BENCH_COMMIT=$(git rev-parse HEAD) bash bench/gpu_check.sh "ours default" "torchtune default" "ours ac+offload"
# Each argument is one `python -m bench.run`, which writes one result file (command, commit, date, GPU, package
# versions, per-run rows). On the lent machine only what is under $OUT comes back, so with $OUT set the files go
# to $OUT/results/: whoever runs this script copies them into bench/results/ of the checkout and runs
# `python -m bench.report` to regenerate BENCHMARKS.md's tables. Without $OUT they go to bench/results/ directly.
# The lent machine's copy of the tree has no .git, hence BENCH_COMMIT. BENCH_TABLE=NAME files the results under
# another BENCHMARKS.md table (gpu_check_fsdp.sh uses gpu-fsdp); BENCH_ARGS adds bench.run options to every run
# (BENCH_ARGS="--train-on-input false").
set -u
out=${OUT:-/tmp/bench-out}
results=${OUT:+$OUT/results}
results=${results:-bench/results}
per_run=${PER_RUN_TIMEOUT:-165}
mkdir -p "$out" "$results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, torchtune, torchao, datasets; print(torch.__version__, torchtune.__version__, torchao.__version__, datasets.__version__)"
python3 -m lora_tools.tiny_assets --out assets/tiny
python3 -c "from bench.run import build_model; build_model('3b', 'cuda')"
for spec in "$@"; do
  set -- $spec
  name="$1-${2//+/_}"
  # A run stopped by `timeout` leaves its file with "complete": false and the rows finished so far.
  timeout $((per_run + 10)) python3 -m bench.run --device cuda --stacks "$1" --variants "$2" --steps 15 \
    --timeout "$per_run" --results-dir "$results" ${BENCH_TABLE:+--table "$BENCH_TABLE"} ${BENCH_ARGS:-} | grep '^{'
  tail -c 600 outputs/bench/"$1-$2"-0/console.txt > "$out/console-$name.txt" 2>/dev/null
done
ls "$results"
