#!/usr/bin/env bash
# The memory plan on a lent GPU (issue K). Each argument is a budget in GiB, or "none": 20 steps of our recipe on
# the 3B shape at packed 4 x 2048 with memory_budget=<budget>GiB and the process's CUDA memory capped there
# (torch.cuda.set_per_process_memory_fraction, bench/capped/sitecustomize.py); "none" runs with no budget and no
# checkpointing (the unconstrained best) and counts torch.compile's recompiles. Two commands of about 5 minutes
# each on an H200 fit the device tool's 10-minute limit:
#   BENCH_COMMIT=$(git rev-parse HEAD) bash bench/gpu_plan_check.sh none 8 12
#   BENCH_COMMIT=$(git rev-parse HEAD) bash bench/gpu_plan_check.sh 16 24 40
# Each row records the plan's choice and predicted peak next to max_memory_allocated/reserved, tokens/s and MFU.
# Wheels for torchtune, torchao, omegaconf and the rest travel in .whl/ as for gpu_check.sh. The result files go
# to $OUT/results/ (copy them into bench/results/ and run python -m bench.report: BENCHMARKS.md's gpu-plan
# table); the last lines of each run's console go to $OUT.
set -u
per_run=${PER_RUN_TIMEOUT:-150}
source "$(dirname "$0")/gpu_setup.sh"
common=(--device cuda --model 3b --stacks ours --variants default --steps 20 --timeout "$per_run")
common+=(--results-dir "$results" --table gpu-plan)
for budget in "$@"; do
  if [ "$budget" = none ]; then
    extra=(--recompiles)
  else
    extra=(--memory-budget "$budget")
  fi
  timeout $((per_run + 30)) python3 -m bench.run "${common[@]}" "${extra[@]}" | grep '^{'
  tail -c 1500 outputs/bench/ours-default-0/console.txt > "$out/console-plan-$budget.txt" 2>/dev/null
done
ls "$results"
