"""Issue E: validation and early stopping, sample generations, DoRA and QLoRA, and the generate command."""

import json
import math
import re
import subprocess
import sys

import torch
from conftest import REPO, TINY_CONFIG, hf_logits, logged_metrics, offline_env, recipe_logits, tiny_cfg, tune
from omegaconf import OmegaConf
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.modules.peft import get_merged_lora_ckpt

from bench.qlora_merge import answers, heldout_loss
from lora_finetune_single_device import LoRAFinetuneRecipe
from lora_tools.checkpoints import latest_checkpoint, load_recipe_state
from lora_tools.config import settings
from lora_tools.eval.inference import PromptFormat, load_model


def run_tiny(out, *overrides):
    result = tune(
        "run", "lora_finetune_single_device.py", "--config", "configs/tiny.yaml", f"output_dir={out}", *overrides
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_validation_and_samples_at_the_configured_steps(tmp_path):
    out = tmp_path / "out"
    result = run_tiny(out, "max_steps_per_epoch=20", "run_val_every_n_steps=7", "sample_every_n_steps=10")
    steps = logged_metrics(out)
    assert sorted(s for s, m in steps.items() if "val_loss" in m) == [0, 7, 14, 20]
    # The recipe logs math.exp(val_loss) and the text log keeps every digit: equal here but for exp's own rounding
    # (2^-52); 2^-20 relative leaves room for a logger that stores float32 (2^-24 per rounding).
    assert all(
        math.isclose(steps[s]["val_perplexity"], math.exp(steps[s]["val_loss"]), rel_tol=2**-20) for s in (0, 20)
    )
    sampled = re.findall(r"sample at step (\d+) \| '([^']*)' ->", result.stdout + result.stderr)
    assert sorted({int(step) for step, _ in sampled}) == [0, 10, 20]  # the base's answers first
    assert {prompt for _, prompt in sampled} == set(OmegaConf.load(TINY_CONFIG).sample_prompts)
    table = result.stdout[result.stdout.index("perplexity") :]
    assert re.search(r"before\s+\d+\.\d+\s+\d+\.\d+", table) and re.search(r"after\s+\d\.\d+\s+\d+\.\d+", table)


def test_early_stopping_after_patience_runs_out(tmp_path):
    out = tmp_path / "out"
    # lr 0: the validation loss can never improve on step 0's, so patience 1 stops at the first validation.
    result = run_tiny(
        out, "max_steps_per_epoch=50", "run_val_every_n_steps=5", "early_stopping_patience=1", "optimizer.lr=0"
    )
    steps = logged_metrics(out)
    assert max(s for s, m in steps.items() if "loss" in m) == 5
    assert "Early stopping at step 5" in result.stdout + result.stderr
    assert latest_checkpoint(out).name == "step_0000005"


def test_dora_adapter_loads_in_peft_with_the_recipes_logits(tmp_path):
    out = tmp_path / "out"
    run_tiny(out, "model.use_dora=True", "max_steps_per_epoch=20")
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    ours = recipe_logits(ckpt, tmp_path, **{"model.use_dora": True})
    hf = hf_logits(ckpt, tmp_path)
    tolerance = 1e-4 * ours.abs().max().item()
    assert (hf["peft"] - ours).abs().max().item() <= tolerance
    assert (hf["merged"] - ours).abs().max().item() <= tolerance
    assert (hf["peft"] - hf["base"]).abs().max().item() > 100 * tolerance


def test_qlora_on_the_tiny_model(tmp_path):
    cfg = tiny_cfg(output_dir=str(tmp_path / "out"), max_steps_per_epoch=40, **{"model.quantize_base": True})
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, "test config"))
    recipe.setup()
    frozen = [m for name, m in recipe._model.named_modules() if name.endswith(("q_proj", "v_proj", "w1", "w2", "w3"))]
    assert frozen and all(isinstance(m.weight, NF4Tensor) for m in frozen)
    recipe.train()
    recipe.finish()
    recipe.cleanup()
    losses = [m["loss"] for _, m in sorted(logged_metrics(tmp_path / "out").items()) if "loss" in m]
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]

    # The exported adapter loads with peft on the full-precision base and changes its output.
    hf = hf_logits(recipe.last_checkpoint, tmp_path)
    assert torch.isfinite(hf["peft"]).all()
    assert (hf["peft"] - hf["base"]).abs().max().item() > 0.1

    # The merged model (qlora_merge_base's default, dequantized) scores as the trained NF4 model did; merged into
    # the original weights instead, it drifts (bench/results/qlora/ has the full comparison).
    loader, prompt_format = recipe._val_dataloader, PromptFormat(cfg, recipe._tokenizer)
    heldout = json.loads((REPO / "assets/tiny/data/heldout.json").read_text())
    prompts = [prompt_format.tokens([{"role": "user", "content": e["instruction"]}]) for e in heldout[:10]]
    trained = recipe._model.eval()
    scores = {"trained": (heldout_loss(trained, loader), answers(trained, prompts, recipe._tokenizer))}
    merged, _ = load_model(cfg, None, merged=True)
    scores["default"] = (heldout_loss(merged, loader), answers(merged, prompts, recipe._tokenizer))
    state = recipe._checkpointer.load_checkpoint()["model"] | load_recipe_state(recipe.last_checkpoint)["adapter"]
    spec = recipe._adapter_spec
    merged.load_state_dict(get_merged_lora_ckpt(state, rank=spec.rank, alpha=spec.alpha), strict=False)
    scores["original"] = (heldout_loss(merged, loader), answers(merged, prompts, recipe._tokenizer))
    loss = scores["trained"][0]
    assert abs(scores["default"][0] - loss) <= 0.01 * loss
    assert scores["default"][1] == scores["trained"][1]
    assert scores["original"][0] != scores["default"][0]


def test_generate_returns_the_argmax_tokens_of_the_recipes_model(tmp_path):
    out = tmp_path / "out"
    run_tiny(out, "max_steps_per_epoch=40", "~sample_prompts")
    prompt = "What color is the lemon?"
    cmd = [sys.executable, "-m", "lora_tools.generate", "--config", "configs/tiny.yaml", f"output_dir={out}"]
    cmd += ["--prompt", prompt, "--max-new-tokens", "24", "--print-token-ids"]
    result = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (ids_line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("token ids:")]
    generated = [int(t) for t in ids_line.split(":", 1)[1].split()]

    # The recipe's model resumed from the same checkpoint, through torchtune's own full forward (all positions,
    # no KV cache): a plain argmax loop.
    cfg = tiny_cfg(output_dir=str(out), resume_from_checkpoint=True, max_steps_per_epoch=40)
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, "test config"))
    recipe.setup()
    recipe._model.eval()
    tokens = PromptFormat(cfg, recipe._tokenizer).tokens([{"role": "user", "content": prompt}])
    expected = []
    with torch.no_grad():
        for _ in range(24):
            token = int(recipe._model(torch.tensor([tokens + expected]))[0, -1].argmax())
            if token in recipe._tokenizer.stop_tokens:
                break
            expected.append(token)
    assert generated == expected and len(expected) > 0
    text = recipe._tokenizer.decode(expected)
    assert text in result.stdout
