#!/usr/bin/env bash
# The distributed recipe on a lent one-GPU machine (NCCL, one torchrun process): first the tiny model through
# both recipes with the same batch (the per-step losses must agree), then the 3B shape next to the
# single-device recipe with bench/gpu_check.sh.
#   BENCH_COMMIT=$(git rev-parse HEAD) bash bench/gpu_check_fsdp.sh
# Result files (the tiny comparison, table gpu-fsdp-tiny, and one per 3B run, table gpu-fsdp) go to
# $OUT/results/ on the lent machine, where only $OUT comes back: whoever runs this copies them into
# bench/results/ and runs `python -m bench.report`. Without $OUT they go to bench/results/ directly.
set -u
out=${OUT:-/tmp/bench-out}
results=${OUT:+$OUT/results}
results=${results:-bench/results}
mkdir -p "$out" "$results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m lora_tools.tiny_assets --out assets/tiny
tiny=(--config configs/tiny.yaml device=cuda dtype=fp32 max_steps_per_epoch=30 ~sample_prompts metric_logger.filename=log.txt)
python3 -m torchtune._cli.tune run lora_finetune_single_device.py "${tiny[@]}" output_dir=outputs/gpu-single \
  > "$out/tiny-single.txt" 2>&1
python3 -m torchtune._cli.tune run --nproc_per_node 1 lora_finetune_distributed.py "${tiny[@]}" \
  output_dir=outputs/gpu-fsdp > "$out/tiny-fsdp.txt" 2>&1
RESULTS="$results" TINY_ARGS="${tiny[*]}" python3 - <<'PY'
import json, os, re
from pathlib import Path
from bench.run import result_metadata, result_path
def read(d):
    rows = {}
    for line in open(f"outputs/{d}/logs/log.txt"):
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            rows.setdefault(int(m.group(1)), {}).update((k, float(v)) for k, v in (kv.split(":", 1) for kv in m.group(2).split()))
    return rows
a, b = read("gpu-single"), read("gpu-fsdp")
rows = []
for key in ("loss", "val_loss"):
    steps = [s for s in a if key in a[s]]
    diff = max(abs(a[s][key] - b[s][key]) for s in steps)
    print(key, len(steps), "steps, max |single - fsdp| =", diff)
    rows.append({"metric": key, "steps": len(steps), "max_abs_diff": diff})
print("tokens/s single", sorted(a[s]["tokens_per_second"] for s in a if "loss" in a[s])[15], "fsdp", sorted(b[s]["tokens_per_second"] for s in b if "loss" in b[s])[15])
device = os.environ.get("DEVICE", "cuda")
tiny = os.environ["TINY_ARGS"]
command = (f"bash bench/gpu_check_fsdp.sh: tune run lora_finetune_single_device.py {tiny} output_dir=outputs/gpu-single; "
           f"tune run --nproc_per_node 1 lora_finetune_distributed.py {tiny} output_dir=outputs/gpu-fsdp")
meta = result_metadata(command, device)
settings = {"device": device, "model": "tiny", "config": "configs/tiny.yaml", "dtype": "fp32", "steps": 30}
path = result_path(Path(os.environ["RESULTS"]), meta["date"], "gpu-fsdp-tiny", ["ours", "ours-fsdp"], ["tiny"])
path.write_text(json.dumps({**meta, "table": "gpu-fsdp-tiny", "settings": settings, "complete": True, "rows": rows}, indent=1) + "\n")
print("result file:", path)
PY
tail -n 4 "$out/tiny-fsdp.txt"
BENCH_TABLE=gpu-fsdp bash bench/gpu_check.sh "ours default" "ours-fsdp default" "ours-fsdp ac"
