# Sourced by bench/gpu_check.sh and bench/gpu_plan_check.sh on a lent GPU machine: where the output and the
# result files go ($OUT/results/ when $OUT is set, else bench/results/), torchtune and the rest installed from
# the wheels in .whl/, the GPU and versions printed, the tiny assets and the random 3B-shaped model built.
out=${OUT:-/tmp/bench-out}
results=${OUT:+$OUT/results}
results=${results:-bench/results}
mkdir -p "$out" "$results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, torchtune, torchao, datasets; print(torch.__version__, torchtune.__version__, torchao.__version__, datasets.__version__)"
python3 -m lora_tools.tiny_assets --out assets/tiny
python3 -c "from bench.run import build_model; build_model('3b', 'cuda')"
