"""Preference tuning (DPO, ORPO): the losses against TRL's on one batch, the tiny DPO demo moving, exact resume,
the outputs and the memory plan."""

import json
import subprocess

import pytest
import torch

from conftest import HF_PYTHON, REPO, TINY
from lora_tools.config import settings
from lora_tools.config.loader import load_config
from lora_tools.train import objectives

DPO_CONFIG = "configs/tiny_dpo.yaml"


def recipe_on_the_base(tmp_path, *overrides):
    """The DPO demo config set up in this process on the tiny base model (no SFT run needed), held-out pairs."""
    from lora_finetune_single_device import LoRAFinetuneRecipe

    argv = [DPO_CONFIG, f"output_dir={tmp_path}", f"checkpointer.checkpoint_dir={TINY}", "val_dataset=null"]
    argv += ["sample_prompts=[]", "dataset.source=assets/tiny/data/pairs_heldout.jsonl", *overrides]
    cfg = load_config(["--config", *argv])
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, "test config"))
    recipe.setup()
    return recipe


def trl_pairs(batch) -> list[dict]:
    """The batch's pairs as TRL's collator takes them: prompt ids, then each response's ids (its labels' span)."""
    tokens, labels, lengths = batch["tokens"], batch["labels"], batch["lengths"]
    b = len(tokens) // 2
    pairs = []
    for i in range(b):
        pair = {}
        for side, row in (("chosen", i), ("rejected", b + i)):
            first = int((labels[row] != -100).nonzero()[0])  # label at p is token p + 1: the response starts there
            prompt = tokens[row, : first + 1].tolist()
            assert pair.setdefault("prompt_ids", prompt) == prompt  # both sides share the prompt
            pair[f"{side}_ids"] = tokens[row, first + 1 : int(lengths[row])].tolist()
            # the response's tokens are exactly its labels, ending in <|eot_id|>
            assert pair[f"{side}_ids"] == labels[row][labels[row] != -100].tolist()
        pairs.append(pair)
    return pairs


def test_dpo_and_orpo_losses_and_metrics_equal_trls(tmp_path):
    """One batch of 4 held-out pairs on the tiny model with a random (non-zero) adapter, so the policy differs from
    the reference (the base). Ours in this process; TRL 1.16's DPOTrainer and ORPOTrainer in .venv-hf on the same
    weights (our saved PEFT adapter on the base) and the same token ids."""
    recipe = recipe_on_the_base(tmp_path / "run", "batch_size=4")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in recipe.adapter_params.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    recipe.save_checkpoint()
    batch = next(iter(recipe._dataloader))
    pairs = trl_pairs(batch)
    assert all(p["chosen_ids"] != p["rejected_ids"] for p in pairs)

    def ours(objective) -> dict[str, float]:
        counts = objective.counts(batch)
        with torch.no_grad():
            _, sums = objective(recipe._parts, batch, counts)
        return objective.reduce(sums, counts)

    dpo = ours(recipe._objective)
    orpo = ours(objectives.ORPO(beta=0.1, nll_on_prompt=True))  # TRL's NLL counts the prompt too

    request = tmp_path / "pairs.json"
    request.write_text(json.dumps({"pairs": pairs, "beta": 0.1}))
    out = tmp_path / "trl.json"
    adapter = recipe.last_checkpoint / "adapter"
    command = [HF_PYTHON, REPO / "tests" / "hf_preference_loss.py", TINY, adapter, request, out]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    trl = json.loads(out.read_text())

    print({k: (dpo[k], trl["dpo"][k]) for k in dpo if k in trl["dpo"]})
    print({k: (orpo[k], trl["orpo"][k]) for k in orpo if k in trl["orpo"]})
    assert abs(dpo["rewards/margins"]) > 1e-3  # the adapter moved the policy away from the reference
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert dpo[key] == pytest.approx(trl["dpo"][key], abs=1e-5), key
    for key in ("logps/chosen", "logps/rejected"):
        assert dpo[key] == pytest.approx(trl["dpo"][key], rel=1e-5), key
    for key in ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected"):
        assert orpo[key] == pytest.approx(trl["orpo"][key], abs=1e-5), key
