"""Speed and memory of this project's LoRA recipe next to torchtune 0.6.1's own recipe and Hugging Face
transformers + peft + TRL's SFTTrainer, on one machine.

    python -m bench.run                                   # CPU, small Llama-3.2 shape with the real 128k vocabulary
    python -m bench.run --device cuda --model 3b          # GPU, Llama-3.2-3B's exact shape, bf16, packed 2048
    python -m bench.run --stacks ours,ours-fsdp           # the distributed recipe as one torchrun process

Every stack trains the same LoRA (the shipped config's rank, targets, optimizer and schedule) on the same random
model and the same tokenized samples packed to the same length, launched as users launch it (`tune run ...`;
TRL in its own environment, .venv-hf, since peft refuses to import beside torchtune's torchao). Reported per
run: tokens/s (median over the steps after warm-up, trained tokens only), peak memory (RSS on CPU; max allocated
and reserved on CUDA), time from launch to the first step, final loss; on CUDA also model FLOPs utilization.

Every invocation writes one result file, bench/results/<date>-<table>-<stacks>-<variants>.json (or --json PATH):
the command line, `git rev-parse HEAD`, the date, the machine, the package versions, the settings and one row
per training run. `python -m bench.report` builds BENCHMARKS.md's tables from those files; the file's "table"
names the table it belongs to (--table; by default chosen from the device, stacks and train_on_input).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny"
VOCAB = 128_256
SHAPES = {
    "small": dict(num_layers=2, num_heads=8, num_kv_heads=2, embed_dim=256, intermediate_dim=768),
    "3b": dict(num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072, intermediate_dim=8192),
}
COMMON_SHAPE = dict(max_seq_len=131_072, norm_eps=1e-5, rope_base=500_000, scale_factor=32)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU
LORA_RANK = 64
RECIPES = {
    "ours": ["lora_finetune_single_device.py"],
    "ours-fsdp": ["--nproc_per_node", "1", "lora_finetune_distributed.py"],  # FSDP2 + NCCL/gloo, one process
    "torchtune": ["lora_finetune_single_device"],
}
HF_PYTHON = REPO / ".venv-hf" / "bin" / "python"
RESULTS = REPO / "bench" / "results"
VARIANT_FLAGS = {
    "default": {},
    "ac": {"ac": True},
    "ac+offload": {"ac": True, "offload": True},
    "nocompile": {"compile": False},
    "nochunk": {"chunked": False},
}
VERSIONS = ("torch", "torchtune", "torchao", "torchdata", "datasets")
HF_VERSIONS = ("torch", "transformers", "peft", "trl", "datasets")


def build_model(model: str, device: str) -> Path:
    """Random weights of the chosen shape with the real 128k vocabulary, once per machine."""
    import torch

    from lora_tools.demo import assets as tiny_assets

    out = REPO / "assets" / f"bench-{model}"
    if not (out / "model.safetensors").exists():
        specials = tiny_assets.special_tokens(VOCAB - 256)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        tiny_assets.write_model(out, VOCAB, specials, {**SHAPES[model], **COMMON_SHAPE}, device=device, dtype=dtype)
    return out


def overrides(model_dir: Path, model: str, device: str, steps: int, batch: int, seq: int, out: Path, **flags):
    shape = {**SHAPES[model], **COMMON_SHAPE}
    return [
        "model._component_=torchtune.models.llama3_2.lora_llama3_2",
        *(f"model.{k}={v}" for k, v in shape.items()),
        f"model.vocab_size={VOCAB}",
        f"checkpointer.checkpoint_dir={model_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={TINY}/original/tokenizer.model",
        f"tokenizer.special_tokens_path={TINY}/special_tokens.json",
        f"tokenizer.max_seq_len={seq}",
        "dataset.source=json",
        f"dataset.data_files={TINY}/data/train.json",
        "dataset.packed=True",
        "val_dataset=null",  # no validation or sample answers in a speed measurement
        "sample_prompts=[]",
        f"dataset.train_on_input={flags.get('train_on_input', True)}",
        f"batch_size={batch}",
        "gradient_accumulation_steps=1",
        f"max_steps_per_epoch={steps}",
        "seed=0",
        f"device={device}",
        f"dtype={'bf16' if device == 'cuda' else 'fp32'}",
        f"compile={flags.get('compile', device == 'cuda')}",
        f"enable_activation_checkpointing={flags.get('ac', False)}",
        f"enable_activation_offloading={flags.get('offload', False)}",
        f"optimizer.fused={device == 'cuda'}",
        "save_adapter_weights_only=True",
        "save_every_n_steps=null",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        "metric_logger.filename=bench.txt",
        f"output_dir={out}",
        f"log_peak_memory_stats={device == 'cuda'}",
    ] + ([] if flags.get("chunked", True) else ["loss._component_=torch.nn.CrossEntropyLoss"])


def tokenized_samples(out: Path, seq: int, train_on_input: bool) -> tuple[Path, int]:
    """The training samples as token ids + completion mask, tokenized by torchtune exactly as the recipes do."""
    from torchtune.datasets import alpaca_cleaned_dataset
    from torchtune.models.llama3 import llama3_tokenizer

    tokenizer = llama3_tokenizer(
        f"{TINY}/original/tokenizer.model", special_tokens_path=f"{TINY}/special_tokens.json", max_seq_len=seq
    )
    data = f"{TINY}/data/train.json"
    ds = alpaca_cleaned_dataset(tokenizer, source="json", data_files=data, train_on_input=train_on_input)
    path = out / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for sample in ds:
            mask = [int(label != -100) for label in sample["labels"]]
            f.write(json.dumps({"input_ids": sample["tokens"], "completion_mask": mask}) + "\n")
    return path, tokenizer.pad_id


def command(stack: str, args: list[str], trl_args: list[str]) -> list[str]:
    """How a user launches each stack."""
    if stack == "trl":
        return [str(HF_PYTHON), str(REPO / "bench" / "trl_sft.py"), *trl_args]
    tune = [sys.executable, "-m", "torchtune._cli.tune", "run", *RECIPES[stack]]
    return [*tune, "--config", "lora_finetune_single_device.yaml", *args]


def read_steps(log_file: Path) -> dict[int, dict[str, float]]:
    """Per-step metrics from torchtune's DiskLogger text file or the TRL script's JSON lines."""
    steps: dict[int, dict[str, float]] = {}
    for line in log_file.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            steps[int(record.pop("step"))] = {k: float(v) for k, v in record.items()}
            continue
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            pairs = dict(kv.split(":", 1) for kv in m.group(2).split())
            steps.setdefault(int(m.group(1)), {}).update({k: float(v) for k, v in pairs.items()})
    return {k: v for k, v in steps.items() if "loss" in v}


def run_stack(stack: str, cmd: list[str], out: Path, timeout: int, extra_env: dict | None = None) -> dict:
    """Launch one training run the way a user does; time it; read its metrics back."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", **(extra_env or {}))
    log_file = out / ("steps.jsonl" if stack == "trl" else "logs/bench.txt")
    out.mkdir(parents=True, exist_ok=True)
    console = out / "console.txt"
    start = time.monotonic()
    with open(console, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    first_step, status, usage = None, None, None
    while status is None:  # os.wait4 (not Popen.poll) so we get this child's own peak RSS
        pid, raw_status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, usage = os.waitstatus_to_exitcode(raw_status), ru
            break
        if first_step is None and log_file.is_file() and read_steps(log_file):
            first_step = time.monotonic() - start
        if time.monotonic() - start > timeout:
            proc.kill()
        time.sleep(0.05)
    if status != 0 or not log_file.is_file():
        lines = console.read_text().strip().splitlines()
        return {"error": f"exit {status}: " + (lines[-1] if lines else "")}
    steps = read_steps(log_file)
    rates = [s.get("tokens_per_second", s.get("tokens_per_second_per_gpu")) for _, s in sorted(steps.items())]
    warm = rates[3:] if len(rates) > 4 else rates[1:] or rates
    result = {
        "tokens_per_second": statistics.median(warm),
        "time_to_first_step_s": first_step,
        "final_loss": steps[max(steps)]["loss"],
        "steps": len(steps),
        "peak_rss_gib": usage.ru_maxrss / 1024**2,
    }
    for key in ("peak_memory_alloc", "peak_memory_reserved"):
        if key in steps[max(steps)]:
            result[key + "_gib"] = max(s[key] for s in steps.values())
    text = console.read_text(errors="replace")
    if "recompiles" in env.get("TORCH_LOGS", ""):
        result["recompiles"] = text.count("Recompiling function")
    plan = re.search(r"^memory plan: .*predicted peak ([0-9.]+) GiB.*overrides: (.*)$", text, re.M)
    if plan:
        result["predicted_peak_gib"], result["plan_overrides"] = float(plan.group(1)), plan.group(2).strip()
    return result


def flops_per_token(model: str, seq: int) -> tuple[float, dict]:
    """4N + 3A + 6N_lora: frozen matmuls forward and input-gradient, causal attention, LoRA forward+backward."""
    s = SHAPES[model]
    d, ff, layers = s["embed_dim"], s["intermediate_dim"], s["num_layers"]
    kv = d // s["num_heads"] * s["num_kv_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff  # q, o, k, v, w1, w2, w3
    n = layers * per_layer + VOCAB * d  # tied output head included
    attention = 2 * layers * seq * d
    lora_per_layer = LORA_RANK * ((d + d) + (d + kv) + (d + d) + 3 * (d + ff))  # q, v, o, w1, w2, w3
    n_lora = layers * lora_per_layer
    return 4 * n + 3 * attention + 6 * n_lora, {"N": n, "A": attention, "N_lora": n_lora}


def default_table(device: str, model: str, stacks: list[str], train_on_input: str) -> str:
    """The BENCHMARKS.md table a run belongs to, unless --table names another."""
    if device == "cpu":
        return "cpu-trl" if "trl" in stacks else "cpu-train-on-input"
    if "ours-fsdp" in stacks:
        return "gpu-fsdp"
    return f"gpu-{model}-train-on-input-{train_on_input}"


def _git(*args: str) -> str | None:
    try:
        run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def result_metadata(command: str, device: str, hf_stack: bool = False) -> dict:
    """Where a result comes from: command, commit, date, machine and package versions.

    The commit is `git rev-parse HEAD`, or $BENCH_COMMIT where the tree has no .git (the lent GPU machine gets a
    copy of the working tree without it). ``tree_dirty`` says whether tracked files differed from that commit.
    """
    commit = os.environ.get("BENCH_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    status = None if os.environ.get("BENCH_COMMIT") else _git("status", "--porcelain", "--untracked-files=no")
    versions = {"python": platform.python_version(), **_versions(VERSIONS)}
    if hf_stack and HF_PYTHON.exists():  # TRL runs in its own environment
        code = f"import importlib.metadata as m, json; print(json.dumps({{n: m.version(n) for n in {HF_VERSIONS!r}}}))"
        run = subprocess.run([str(HF_PYTHON), "-c", code], capture_output=True, text=True)
        if run.returncode == 0:
            versions.update({("torch (.venv-hf)" if k == "torch" else k): v for k, v in json.loads(run.stdout).items()})
    machine = {"device": _cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda":
        import torch

        machine["device"] = torch.cuda.get_device_name()
        machine["cpu"] = _cpu_name()
    return {
        "command": command,
        "commit": commit,
        "tree_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions,
    }


def result_path(results_dir: Path, date: str, table: str, stacks: list[str], variants: list[str]) -> Path:
    stamp = re.sub(r"[^0-9T]", "", date.split("+")[0])
    name = "-".join([stamp, table, "+".join(stacks), "+".join(variants)])
    return results_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=sorted(SHAPES), default=None, help="default: small on cpu, 3b on cuda")
    parser.add_argument(
        "--stacks", default="ours,torchtune,trl", help="comma-separated: ours, ours-fsdp, torchtune, trl"
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 12 on cpu, 20 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="packed rows per step (default 2 cpu, 4 cuda)")
    parser.add_argument("--seq", type=int, default=None, help="packed row length (default 512 cpu, 2048 cuda)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per stack, alternating the order")
    parser.add_argument(
        "--variants",
        default="default",
        help="cuda memory settings to sweep, comma-separated from: default (compile, no checkpointing), "
        "ac (activation checkpointing), ac+offload, nocompile, nochunk",
    )
    parser.add_argument(
        "--train-on-input",
        choices=["true", "false"],
        default="true",
        help="loss on prompts too (true, as the shipped config) or on responses only (false)",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        help="GiB: ours runs with memory_budget=<this>GiB, its CUDA memory capped there (bench/capped)",
    )
    parser.add_argument("--recompiles", action="store_true", help="count torch.compile recompiles (TORCH_LOGS)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the result file goes")
    parser.add_argument("--json", type=Path, help="write the result file here instead (a file name)")
    parser.add_argument("--table", help="the BENCHMARKS.md table the result belongs to (see bench/report.py)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    model = args.model or ("3b" if args.device == "cuda" else "small")
    steps = args.steps or (20 if args.device == "cuda" else 12)
    batch = args.batch or (4 if args.device == "cuda" else 2)
    seq = args.seq or (2048 if args.device == "cuda" else 512)
    model_dir = build_model(model, args.device)
    flops, counts = flops_per_token(model, seq)
    gpu = ""
    if args.device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)

    rows = []
    stacks = args.stacks.split(",")
    variants = args.variants.split(",")
    meta = result_metadata(shlex.join(["python", "-m", "bench.run", *argv]), args.device, hf_stack="trl" in stacks)
    table = args.table or default_table(args.device, model, stacks, args.train_on_input)
    settings = dict(device=args.device, model=model, stacks=stacks, variants=variants, steps=steps, batch=batch)
    settings.update(seq=seq, repeats=args.repeats, train_on_input=args.train_on_input == "true", lora_rank=LORA_RANK)
    extra_env = {"TORCH_LOGS": "recompiles"} if args.recompiles else {}
    if args.memory_budget:
        settings["memory_budget_gib"] = args.memory_budget
        path = os.pathsep.join(p for p in (str(REPO / "bench" / "capped"), os.environ.get("PYTHONPATH")) if p)
        extra_env.update(BENCH_GPU_MEMORY_GIB=str(args.memory_budget), PYTHONPATH=path)
    result = {**meta, "table": table, "settings": settings, "flops_per_token": flops, **counts, "complete": False}
    result_file = args.json or result_path(args.results_dir, meta["date"], table, stacks, variants)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    trl_args = []
    if "trl" in stacks:
        samples, pad_id = tokenized_samples(REPO / "outputs" / "bench", seq, args.train_on_input == "true")
        trl_args = ["--model-dir", str(model_dir), "--data", str(samples), "--steps", str(steps)]
        trl_args += ["--batch", str(batch), "--seq", str(seq), "--pad-id", str(pad_id), "--device", args.device]
    for variant in variants:
        for repeat in range(args.repeats):
            order = stacks if repeat % 2 == 0 else stacks[::-1]
            for stack in order:
                out = REPO / "outputs" / "bench" / f"{stack}-{variant}-{repeat}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                flags = {**VARIANT_FLAGS[variant], "train_on_input": args.train_on_input == "true"}
                run_args = overrides(model_dir, model, args.device, steps, batch, seq, out, **flags)
                if args.memory_budget and stack.startswith("ours"):
                    run_args.append(f"memory_budget={args.memory_budget}GiB")
                cmd = command(stack, run_args, [*trl_args, "--out", str(out)])
                run = run_stack(stack, cmd, out, args.timeout, extra_env if stack.startswith("ours") else None)
                if "tokens_per_second" in run and peak:
                    run["mfu"] = run["tokens_per_second"] * flops / peak
                rows.append({"stack": stack, "variant": variant, "repeat": repeat, **run})
                print(json.dumps(rows[-1]), flush=True)
                result_file.write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n")  # kept if interrupted
    result_file.write_text(json.dumps({**result, "complete": True, "rows": rows}, indent=1) + "\n")

    print(
        f"\n{model} shape, {args.device}, batch {batch} x {seq} packed, {steps} steps, LoRA rank {LORA_RANK}, "
        f"train_on_input {args.train_on_input}"
    )
    print(f"FLOPs per trained token (4N + 3A + 6N_lora): {flops / 1e9:.2f} G  ({counts})")
    header = "| stack | variant | tokens/s (median) | vs ours | first step (s) | final loss | peak memory | MFU |"
    print(header + "\n|" + " --- |" * 8)
    by_variant = {}
    for row in rows:
        by_variant.setdefault((row["variant"], row["stack"]), []).append(row)
    for (variant, stack), group in by_variant.items():
        if any("error" in r for r in group):
            print(f"| {stack} | {variant} | failed: {group[0].get('error', '')[:80]} |")
            continue
        tps = statistics.median(r["tokens_per_second"] for r in group)
        ours = by_variant.get((variant, "ours"))
        ratio = tps / statistics.median(r["tokens_per_second"] for r in ours) if ours and "error" not in ours[0] else 0
        first = statistics.median(r["time_to_first_step_s"] or 0 for r in group)
        loss = group[0]["final_loss"]
        if "peak_memory_alloc_gib" in group[0]:
            mem = f"{group[0]['peak_memory_alloc_gib']:.1f} / {group[0]['peak_memory_reserved_gib']:.1f} GiB alloc/resv"
        else:
            mem = f"{statistics.median(r['peak_rss_gib'] for r in group):.2f} GiB RSS"
        mfu = f"{group[0]['mfu']:.1%}" if "mfu" in group[0] else "-"
        print(f"| {stack} | {variant} | {tps:,.0f} | {ratio:.2f}x | {first:.1f} | {loss:.3f} | {mem} | {mfu} |")
    print(f"\nresult file: {result_file} (table {table}; python -m bench.report puts it in BENCHMARKS.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
