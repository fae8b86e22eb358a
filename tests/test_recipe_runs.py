"""The recipe end to end through the real `tune run`: the tiny demo and the shipped 3B config on CPU."""

import math

import pytest
from conftest import DEMO_STEP_DIR, DEMO_STEPS, DEMO_VAL_EVERY, TINY, ln_vocab, logged_metrics, tiny_vocab_size, tune

from lora_tools.checkpoints import STATE_KEYS, load_recipe_state


def _summary_value(stdout: str, prefix: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith(prefix)]
    return line


def test_tiny_demo_teaches_the_task(demo):
    """What `make demo` runs: sane first loss, held-out loss down by at least 30%, adapter + merged model."""
    out, result, _ = demo

    steps = logged_metrics(out)
    losses = [steps[s]["loss"] for s in sorted(steps) if "loss" in steps[s]]
    assert len(losses) == DEMO_STEPS
    assert abs(losses[0] - ln_vocab()) / ln_vocab() <= 0.20, (losses[0], ln_vocab())
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]
    for key in ("lr", "tokens_per_second", "grad_norm", "peak_memory_rss"):
        assert all(key in steps[s] for s in range(1, DEMO_STEPS + 1)), key
    assert all(steps[s]["tokens_per_second"] > 0 for s in range(1, DEMO_STEPS + 1))

    val = {s: steps[s]["val_loss"] for s in sorted(steps) if "val_loss" in steps[s]}
    assert sorted(val) == list(range(0, DEMO_STEPS + 1, DEMO_VAL_EVERY)) and val[DEMO_STEPS] <= 0.7 * val[0], val
    assert "held-out loss:" in _summary_value(result.stdout, "held-out loss:")
    assert f"ln(vocab size {tiny_vocab_size()})" in result.stdout

    ckpt = out / "checkpoints" / DEMO_STEP_DIR
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model/model.safetensors"):
        assert (ckpt / name).is_file(), name
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert set(load_recipe_state(ckpt)) == set(STATE_KEYS) | {"history"}  # the layout the resume code checks for
    assert f"{ckpt}/adapter" in result.stdout and f"{ckpt}/model" in result.stdout


SHIPPED_3B = {
    "single_device": (["lora_finetune_single_device.py"], "lora_finetune_single_device.yaml"),
    "distributed_2_processes": (
        ["--nproc_per_node", "2", "lora_finetune_distributed.py"],
        "configs/llama3_2_3b_lora_distributed.yaml",
    ),
}


@pytest.mark.parametrize("launch", SHIPPED_3B.values(), ids=SHIPPED_3B.keys())
def test_shipped_3b_config_runs_two_steps_on_cpu(tmp_path, launch):
    """Only model size, checkpoint, tokenizer, dataset source and device-level settings are overridden."""
    out = tmp_path / "out"
    overrides = [
        # model size
        "model._component_=torchtune.models.llama3_2.lora_llama3_2",
        "model.vocab_size=" + str(tiny_vocab_size()),
        "model.num_layers=4",
        "model.num_heads=8",
        "model.num_kv_heads=2",
        "model.embed_dim=256",
        "model.intermediate_dim=768",
        "model.max_seq_len=2048",
        # checkpoint and tokenizer
        f"checkpointer.checkpoint_dir={TINY}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={TINY}/original/tokenizer.model",
        f"tokenizer.special_tokens_path={TINY}/special_tokens.json",
        # dataset source (the builder stays alpaca_cleaned_dataset)
        "dataset.source=json",
        f"dataset.data_files={TINY}/data/train.json",
        "val_dataset.source=json",
        f"val_dataset.data_files={TINY}/data/heldout.json",
        # device, dtype, compile, offloading, logger
        "device=cpu",
        "dtype=fp32",
        "compile=False",
        "enable_activation_offloading=False",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        # run length and where to write
        "max_steps_per_epoch=2",
        f"output_dir={out}",
    ]
    recipe, config = launch
    result = tune("run", *recipe, "--config", config, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {s: m for s, m in logged_metrics(out).items() if "loss" in m}
    assert sorted(steps) == [1, 2]
    assert all(math.isfinite(steps[s]["loss"]) for s in (1, 2))
    assert steps[1]["lr"] < steps[2]["lr"]  # the shipped warm-up schedule is in force
    assert (out / "checkpoints" / "step_0000002" / "adapter" / "adapter_model.safetensors").is_file()
