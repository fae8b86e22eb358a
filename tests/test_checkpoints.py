"""Issue C: outputs that load in Hugging Face transformers/peft, exact resume, clean stops, atomic checkpoints."""

import json
import signal

import pytest
from conftest import (
    TINY,
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

from lora_tools.checkpointing import CRASH_ENV

# A short run: 160 samples, batch 8, accumulation 2 -> 10 optimizer steps per epoch, 2 epochs.
SHORT = [
    "dataset.split=train[:160]",
    "batch_size=8",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "lr_scheduler.num_warmup_steps=4",
]


# --- outputs load everywhere ------------------------------------------------------------------------------------


def test_adapter_and_merged_model_load_in_transformers_and_peft(tmp_path):
    out = tmp_path / "out"
    run = tune_run(out, "max_steps_per_epoch=30")
    assert run.returncode == 0, run.stderr_text[-3000:]
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_0000030"
    assert sorted(p.name for p in (ckpt / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
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


# --- exact resume ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_steps", ["null", "7"], ids=["max_steps_null", "max_steps_7"])
def test_resume_after_sigkill_is_exact(tmp_path, max_steps):
    common = [*SHORT, f"max_steps_per_epoch={max_steps}", "save_every_n_steps=4"]
    full_out, cut_out = tmp_path / "full", tmp_path / "cut"
    full = tune_run(full_out, *common, "metric_logger.filename=log_full.txt")
    assert full.returncode == 0, full.stderr_text[-3000:]
    expected = losses(full_out, "log_full.txt")
    n_steps = 20 if max_steps == "null" else 14
    assert sorted(expected) == list(range(1, n_steps + 1))

    proc = tune_run(cut_out, *common, "metric_logger.filename=log_first.txt", wait=False)
    wait_for(lambda: pointer(cut_out) == "step_0000008", proc=proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    resumed = tune_run(cut_out, *common, "resume_from_checkpoint=True", "metric_logger.filename=log_resumed.txt")
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    after = losses(cut_out, "log_resumed.txt")
    assert sorted(after) == list(range(9, n_steps + 1))
    for step, loss in after.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step

    want, got = final_adapter(full_out), final_adapter(cut_out)
    assert want.keys() == got.keys()
    for name in want:
        assert (want[name] - got[name]).abs().max().item() <= 1e-6, name


def test_sigterm_saves_the_last_completed_step_and_exits_zero(tmp_path):
    out = tmp_path / "out"
    proc = tune_run(out, "max_steps_per_epoch=null", "metric_logger.filename=log.txt", wait=False)
    log_file = out / "logs" / "log.txt"
    wait_for(lambda: log_file.is_file() and log_file.read_text().count("loss:") >= 3, proc=proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    last_step = max(losses(out, "log.txt"))
    assert last_step < 250  # stopped early (a full epoch is 250 steps)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step_{last_step:07d}"

    # Resumable: a resumed run continues at the next step, and says what changed since the checkpoint.
    resumed = tune_run(
        out,
        f"max_steps_per_epoch={last_step + 2}",
        "resume_from_checkpoint=True",
        "metric_logger.filename=resumed.txt",
    )
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    assert sorted(losses(out, "resumed.txt")) == [last_step + 1, last_step + 2]
    warning = [ln for ln in (resumed.stdout_text + resumed.stderr_text).splitlines() if "changes since" in ln]
    assert len(warning) == 1 and "max_steps_per_epoch" in warning[0] and "metric_logger.filename" in warning[0]


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    common = [*SHORT, "max_steps_per_epoch=null", "save_every_n_steps=3"]
    crashed = tune_run(out, *common, "metric_logger.filename=log_first.txt", env=offline_env(**{CRASH_ENV: "6"}))
    assert crashed.returncode == -signal.SIGKILL
    assert pointer(out) == "step_0000003"
    partial = out / "checkpoints" / ".tmp-step_0000006"
    assert partial.is_dir() and len([p for p in partial.rglob("*") if p.is_file()]) == 1  # killed after 1 file
    assert not (out / "checkpoints" / "step_0000006").exists()

    resumed = tune_run(out, *common, "resume_from_checkpoint=True", "metric_logger.filename=log_resumed.txt")
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    assert sorted(losses(out, "log_resumed.txt")) == list(range(4, 21))
    assert pointer(out) == "step_0000020"
    assert not partial.exists()


def test_keep_last_n_rotates_old_checkpoints(tmp_path):
    out = tmp_path / "out"
    run = tune_run(out, *SHORT, "max_steps_per_epoch=null", "save_every_n_steps=3", "keep_last_n=2")
    assert run.returncode == 0, run.stderr_text[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_0000018", "step_0000020"]


def test_resume_with_a_different_batch_size_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    first = tune_run(out, "max_steps_per_epoch=3", "run_val_every_n_steps=null", "~sample_prompts")
    assert first.returncode == 0, first.stderr_text[-3000:]
    resumed = tune_run(out, "max_steps_per_epoch=6", "resume_from_checkpoint=True", "batch_size=4")
    assert resumed.returncode == 2, resumed.stderr_text[-3000:]
    assert "Traceback" not in resumed.stdout_text + resumed.stderr_text
    assert "error: batch_size is 4 but the checkpoint" in resumed.stderr_text
    assert "batch_size=8" in resumed.stderr_text
