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
per_run=${PER_RUN_TIMEOUT:-165}
source "$(dirname "$0")/gpu_setup.sh"
for spec in "$@"; do
  set -- $spec
  name="$1-${2//+/_}"
  # A run stopped by `timeout` leaves its file with "complete": false and the rows finished so far.
  timeout $((per_run + 10)) python3 -m bench.run --device cuda --stacks "$1" --variants "$2" --steps 15 \
    --timeout "$per_run" --results-dir "$results" ${BENCH_TABLE:+--table "$BENCH_TABLE"} ${BENCH_ARGS:-} | grep '^{'
  tail -c 600 outputs/bench/"$1-$2"-0/console.txt > "$out/console-$name.txt" 2>/dev/null
done
ls "$results"
