#!/usr/bin/env bash
# The memory plan on a lent GPU (issue K), one command, about 8 minutes on an H200: for the 3B shape at packed
# 4 x 2048, 20 steps of our recipe with memory_budget at 8, 12, 16, 24 and 40 GiB, each with the process's CUDA
# memory capped at that budget (torch.cuda.set_per_process_memory_fraction, bench/capped/sitecustomize.py); then
# one run with no budget and no checkpointing (the unconstrained best) counting torch.compile's recompiles.
# Each row records the plan's choice and predicted peak next to max_memory_allocated/reserved and tokens/s; MFU
# comes from the FLOPs count in the file. Wheels for torchtune, torchao, omegaconf and the rest travel in .whl/
# as for gpu_check.sh; the result files go to $OUT/results/ (copy them into bench/results/, then run
# python -m bench.report: BENCHMARKS.md's gpu-plan table).
#   BENCH_COMMIT=$(git rev-parse HEAD) bash bench/gpu_plan_check.sh
set -u
out=${OUT:-/tmp/bench-out}
results=${OUT:+$OUT/results}
results=${results:-bench/results}
per_run=${PER_RUN_TIMEOUT:-80}
mkdir -p "$out" "$results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -m lora_tools.tiny_assets --out assets/tiny
python3 -c "from bench.run import build_model; build_model('3b', 'cuda')"
common=(--device cuda --model 3b --stacks ours --steps 20 --timeout "$per_run" --results-dir "$results" --table gpu-plan)
timeout $((per_run + 30)) python3 -m bench.run "${common[@]}" --variants default --recompiles | grep '^{'
for gib in 8 12 16 24 40; do
  timeout $((per_run + 60)) python3 -m bench.run "${common[@]}" --variants default --memory-budget "$gib" | grep '^{'
done
ls "$results"
