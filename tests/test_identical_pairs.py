"""Pairs whose chosen and rejected responses are the same are not an error: the data command and the recipe go on,
and warn how many there are (preference training learns nothing from them)."""

import json
import subprocess
import sys

from conftest import REPO, TINY, offline_env

DPO_CONFIG = "configs/tiny_dpo.yaml"
ROWS = [
    {"prompt": "What color is the lemon?", "chosen": "Yellow.", "rejected": "Yellow."},
    {"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."},
    {"prompt": "What color is snow?", "chosen": "White.", "rejected": "White."},
]
WARNING = "dataset: 2 of 3 pairs have the same chosen and rejected response"


def _pairs_file(tmp_path) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def test_the_data_command_warns_and_goes_on(tmp_path):
    args = [DPO_CONFIG, f"checkpointer.checkpoint_dir={TINY}", f"dataset.source={_pairs_file(tmp_path)}"]
    result = subprocess.run(
        [sys.executable, "-m", "lora_tools.data", "--config", *args],
        cwd=REPO,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert "error:" not in text and "Traceback" not in text
    warnings = [line for line in text.splitlines() if WARNING in line]
    assert len(warnings) == 1, text[-3000:]
    assert "fix or remove those rows" in warnings[0]
    assert "dataset: pairs whose chosen and rejected responses are the same tokens: 2" in text


def test_the_recipe_logs_the_warning_before_loading_weights(tmp_path, caplog):
    from lora_finetune_single_device import LoRAFinetuneRecipe
    from lora_tools.config import settings
    from lora_tools.config.loader import load_config

    argv = [DPO_CONFIG, f"output_dir={tmp_path / 'out'}", f"checkpointer.checkpoint_dir={TINY}", "val_dataset=null"]
    argv += [f"dataset.source={_pairs_file(tmp_path)}", "batch_size=1", "sample_prompts=[]"]
    cfg = load_config(["--config", *argv])
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, DPO_CONFIG))
    with caplog.at_level("INFO"):
        recipe.setup()
    recipe.cleanup()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    warned = [i for i, (level, message) in enumerate(messages) if level == "WARNING" and WARNING in message]
    assert len(warned) == 1, messages
    ready = next(i for i, (_, message) in enumerate(messages) if message.startswith("Model ready on"))
    assert warned[0] < ready  # with the data summary, before the weights
