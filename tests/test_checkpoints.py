"""Issue C: outputs that load in Hugging Face transformers/peft, exact resume, clean stops, atomic checkpoints."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    TINY_CONFIG,
    final_adapter,
    hf_logits,
    latest_checkpoint,
    losses,
    offline_env,
    pointer,
    recipe_logits,
    tune_run,
    wait_for,
)
from omegaconf import OmegaConf
from wandb_records import history, run_id

# A short run: 160 samples, batch 8, accumulation 2 -> 10 optimizer steps per epoch, 2 epochs.
SHORT = [
    "dataset.split=train[:160]",
    "batch_size=8",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "lr_scheduler.num_warmup_steps=4",
]


# --- outputs load everywhere ------------------------------------------------------------------------------------


def test_adapter_and_merged_model_load_in_transformers_and_peft(tmp_path, run_in_process):
    out = tmp_path / "out"
    run = run_in_process(out, "max_steps_per_epoch=30")
    assert run.returncode == 0, run.stderr_text[-3000:]
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_0000030"
    adapter_files = sorted(p.name for p in (ckpt / "adapter").iterdir())
    # the PEFT files, and the model card with its plot (a finished run's last checkpoint)
    assert adapter_files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_curves.png"]
    model_files = {p.name for p in (ckpt / "model").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= model_files
    adapter_config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(TINY.resolve())
    assert adapter_config["use_dora"] is False and adapter_config["task_type"] == "CAUSAL_LM"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)

    ours = recipe_logits(ckpt, tmp_path)
    hf = hf_logits(ckpt, tmp_path)

    scale = ours.abs().max().item()
    tolerance = 1e-4 * scale
    assert (hf["peft"] - hf["merged"]).abs().max().item() <= tolerance
    assert (hf["peft"] - ours).abs().max().item() <= tolerance
    assert (hf["merged"] - ours).abs().max().item() <= tolerance
    assert (hf["peft"] - hf["base"]).abs().max().item() > 100 * tolerance  # the adapter does change the output

    # The export command writes the same merged model for a checkpoint that has none.
    copy = tmp_path / "copy" / "step_0000030"
    shutil.copytree(ckpt, copy, ignore=shutil.ignore_patterns("model"))
    cmd = [sys.executable, "-m", "lora_tools.export", "--config", "configs/tiny.yaml", "--checkpoint", str(copy)]
    export = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (copy / "model" / "model.safetensors").read_bytes() == (ckpt / "model" / "model.safetensors").read_bytes()


# --- exact resume ------------------------------------------------------------------------------------------------


def _chats(file: str, keys: str) -> str:
    """A dataset section of configs/tiny_chat.yaml reading ``file``, with ``keys`` (YAML flow syntax)."""
    builder = "_component_: lora_tools.data.sft.conversation_dataset, chat_template: assets/tiny"
    return f"{{{builder}, source: assets/tiny/data/{file}, {keys}}}"


# A weighted list of two conversation files on configs/tiny_chat.yaml (lora_tools.data.mixing): pools of 64 and
# 40 samples, half of the epoch's 104 each, so the first gives a subset of its pool and the second repeats its
# own (x1.30). Batch 4, accumulation 2: 13 optimizer steps in the one epoch.
MIXED = [
    f"dataset=[{_chats('chat_train.jsonl', 'weight: 0.5, max_samples: 64')}, "
    f"{_chats('chat_heldout.jsonl', 'weight: 0.5, max_samples: 40')}]",
    "val_dataset=null",
    "sample_prompts=[]",
    "batch_size=4",
    "gradient_accumulation_steps=2",
    "epochs=1",
    "max_steps_per_epoch=null",
    "lr_scheduler.num_warmup_steps=4",
]
# Each run: config, overrides, optimizer steps, and the checkpoint after which the first run is killed.
RESUMED_RUNS = {
    "max_steps_null": ("configs/tiny.yaml", [*SHORT, "max_steps_per_epoch=null"], 20, 8),
    "max_steps_7": ("configs/tiny.yaml", [*SHORT, "max_steps_per_epoch=7"], 14, 8),
    "mixed_datasets": ("configs/tiny_chat.yaml", MIXED, 13, 4),  # killed mid-epoch
}


@pytest.mark.parametrize("name", RESUMED_RUNS)
def test_resume_after_sigkill_is_exact(tmp_path, name):
    config, overrides, n_steps, killed_after = RESUMED_RUNS[name]
    common = [*overrides, "save_every_n_steps=4"]
    full_out, cut_out = tmp_path / "full", tmp_path / "cut"
    full = tune_run(full_out, *common, "metric_logger.filename=log_full.txt", config=config)
    assert full.returncode == 0, full.stderr_text[-3000:]
    expected = losses(full_out, "log_full.txt")
    assert sorted(expected) == list(range(1, n_steps + 1))

    proc = tune_run(cut_out, *common, "metric_logger.filename=log_first.txt", wait=False, config=config)
    wait_for(lambda: pointer(cut_out) == f"step_{killed_after:07d}", proc=proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    again = ["resume_from_checkpoint=True", "metric_logger.filename=log_resumed.txt"]
    resumed = tune_run(cut_out, *common, *again, config=config)
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    after = losses(cut_out, "log_resumed.txt")
    assert sorted(after) == list(range(killed_after + 1, n_steps + 1))
    # One process, the same threads and kernels, the same operations in the same order: exact, no tolerance.
    assert after == {step: expected[step] for step in after}
    want, got = final_adapter(full_out), final_adapter(cut_out)
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)


def test_sigterm_saves_adapter_and_resume_state_first_and_the_resumed_wandb_run_continues(tmp_path):
    """A stop writes the adapter and the resume state only (seconds even for 3B); the merged model comes at the
    end of the run. The resumed run continues the same (offline) W&B run: same id, steps going on."""
    out = tmp_path / "out"
    wandb_logger = ["metric_logger._component_=torchtune.training.metric_logging.WandBLogger", "save_every_n_steps=2"]
    proc = tune_run(out, "max_steps_per_epoch=40", *wandb_logger, wait=False)
    wait_for(lambda: pointer(out) == "step_0000002", proc=proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    stopped = latest_checkpoint(out)
    last_step = int(stopped.name.removeprefix("step_"))
    assert 2 <= last_step < 40  # stopped early
    assert sorted(p.name for p in stopped.iterdir()) == ["adapter", "provenance.json", "recipe_state.pt"]
    assert (stopped / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("model.safetensors"))  # no merged model yet, anywhere

    resumed = tune_run(out, "max_steps_per_epoch=40", *wandb_logger, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    final = latest_checkpoint(out)
    assert final.name == "step_0000040" and (final / "model" / "model.safetensors").is_file()
    assert [p.parent.parent.name for p in out.rglob("model.safetensors")] == ["step_0000040"]

    first_run, second_run = sorted(out.rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    assert run_id(first_run) == run_id(second_run) is not None
    first_steps = {s for s, m in history(first_run).items() if "loss" in m}
    second_steps = {s for s, m in history(second_run).items() if "loss" in m}
    assert max(first_steps) == last_step and sorted(second_steps) == list(range(last_step + 1, 41))


def test_latest_pointer_lost_resumes_this_runs_newest_checkpoint(tmp_path, run_in_process):
    """A run to step 20, then a fresh run to step 8 in the same output_dir: with ``latest`` deleted, resume
    takes step 8 (this run's), not the earlier run's step 20."""
    out = tmp_path / "out"
    common = [*SHORT, "max_steps_per_epoch=null", "save_every_n_steps=4", "val_dataset=null", "sample_prompts=[]"]
    first = run_in_process(out, *common, "metric_logger.filename=log_first.txt")
    assert first.returncode == 0, first.stderr_text[-3000:]
    assert pointer(out) == "step_0000020"
    fresh = run_in_process(out, *common, "epochs=1", "max_steps_per_epoch=8", "metric_logger.filename=log_fresh.txt")
    assert fresh.returncode == 0, fresh.stderr_text[-3000:]
    (aside,) = out.glob("checkpoints-before-*")  # the earlier run's checkpoints, kept, out of the way
    assert (aside / "step_0000020" / "recipe_state.pt").is_file()
    (out / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(out).name == "step_0000008"
    # The fresh run ended its one epoch at step 8; a second epoch continues from there (a longer schedule).
    again = ["max_steps_per_epoch=8", "allow_schedule_change=True", "resume_from_checkpoint=True"]
    resumed = run_in_process(out, *common, *again, "metric_logger.filename=log_resumed.txt")
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    assert sorted(losses(out, "log_resumed.txt")) == list(range(9, 17))


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, run_in_process):
    out = tmp_path / "out"
    common = ["--config", "configs/tiny.yaml", f"output_dir={out}", *SHORT, "max_steps_per_epoch=null"]
    common += ["save_every_n_steps=3"]
    cmd = [sys.executable, str(REPO / "tests" / "crash_during_save.py"), "6", *common]
    crashed = subprocess.run(cmd + ["metric_logger.filename=log_first.txt"], cwd=REPO, env=offline_env())
    assert crashed.returncode == -signal.SIGKILL
    assert pointer(out) == "step_0000003"
    partial = out / "checkpoints" / ".tmp-step_0000006"
    assert partial.is_dir() and len([p for p in partial.rglob("*") if p.is_file()]) == 1  # killed after 1 file
    assert not (out / "checkpoints" / "step_0000006").exists()

    resumed = run_in_process(out, *common[3:], "resume_from_checkpoint=True", "metric_logger.filename=log_resumed.txt")
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    assert sorted(losses(out, "log_resumed.txt")) == list(range(4, 21))
    assert pointer(out) == "step_0000020"
    assert not partial.exists()


def test_keep_last_n_rotates_old_checkpoints(tmp_path, run_in_process):
    out = tmp_path / "out"
    run = run_in_process(out, *SHORT, "max_steps_per_epoch=null", "save_every_n_steps=3", "keep_last_n=2")
    assert run.returncode == 0, run.stderr_text[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_0000018", "step_0000020"]


def test_resume_with_a_different_batch_size_is_refused_in_one_line(tmp_path, run_in_process):
    out = tmp_path / "out"
    first = run_in_process(out, "max_steps_per_epoch=3", "run_val_every_n_steps=null", "~sample_prompts")
    assert first.returncode == 0, first.stderr_text[-3000:]
    resumed = run_in_process(out, "max_steps_per_epoch=6", "resume_from_checkpoint=True", "batch_size=4")
    assert resumed.returncode == 2, resumed.stderr_text[-3000:]
    assert "Traceback" not in resumed.stdout_text + resumed.stderr_text
    assert "error: batch_size is 4 but the checkpoint" in resumed.stderr_text
    assert f"batch_size={OmegaConf.load(TINY_CONFIG).batch_size}" in resumed.stderr_text
