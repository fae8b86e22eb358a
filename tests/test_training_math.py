"""Exactness of the training step, checked on the recipe class itself with the tiny model (CPU, fp32)."""

import json
import math
from collections import Counter

import torch
from conftest import logged_metrics, rounding, tiny_cfg
from torchtune import config, utils

from lora_finetune_single_device import LoRAFinetuneRecipe
from lora_tools.config import settings

IGNORE = -100
# The longest float32 sums in these steps: over a batch's token positions (at most 4 x 512 here) plus the widths a
# value is summed over through the tiny model's 4 layers (256, 768) and head (1684), about 6,300 in all.
SUM_LENGTH = 2**13


def make_recipe(tmp_path, **overrides):
    cfg = tiny_cfg(output_dir=str(tmp_path / "out"), **overrides)
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, "test config"))
    recipe.setup()
    return recipe


def pairs(dataloader) -> Counter:
    """Multiset of (input token, target) pairs that carry loss."""
    out = Counter()
    for batch in dataloader:
        keep = batch["labels"] != IGNORE
        out.update(zip(batch["tokens"][keep].tolist(), batch["labels"][keep].tolist(), strict=True))
    return out


def unpacked_cfg_dataset(overrides):
    cfg = tiny_cfg(**overrides).dataset
    cfg.pop("packed")
    return cfg


def mean_loss(recipe, dataloader) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in dataloader:
            utils.batch_to_device(batch, recipe._device)
            counts = recipe._objective.counts(batch)
            _, sums = recipe._objective(recipe._parts, batch, counts)
            total, n = total + sums["loss"].double().item(), n + int(counts["tokens"])
    return total / n


def test_packed_batches_train_on_the_same_pairs_and_loss(tmp_path):
    common = {"dataset.split": "train[:48]", "shuffle": False, "batch_size": 4, "tokenizer.max_seq_len": 256}
    unpacked = make_recipe(tmp_path, **common, **{"dataset.packed": False})
    # one row per batch, so that no row is left out by the last, partial batch (training drops it)
    packed = make_recipe(tmp_path, **{**common, "batch_size": 1}, **{"dataset.packed": True})
    assert len(packed._dataloader) < 4 * len(unpacked._dataloader)  # several samples share a row

    # Expected: every token whose next token carries a label, paired with that next token, within one sample.
    raw = config.instantiate(unpacked_cfg_dataset(common), unpacked._tokenizer)
    expected = Counter()
    for sample in raw:
        tokens, labels = sample["tokens"], sample["labels"]
        expected.update((tokens[i], tokens[i + 1]) for i in range(len(tokens) - 1) if labels[i + 1] != IGNORE)
    assert pairs(unpacked._dataloader) == expected
    assert pairs(packed._dataloader) == expected
    # Same weights (same seed, no training yet), so the per-token mean loss over the same samples must agree, up to
    # float32 rounding: packed rows sum the same terms in other shapes (conftest.rounding).
    loss_unpacked, loss_packed = mean_loss(unpacked, unpacked._dataloader), mean_loss(unpacked, packed._dataloader)
    assert abs(loss_packed - loss_unpacked) <= rounding(SUM_LENGTH) * loss_unpacked


def _one_sgd_step(tmp_path, batch_size, accumulation):
    recipe = make_recipe(
        tmp_path / f"b{batch_size}x{accumulation}",
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        shuffle=False,
        max_steps_per_epoch=1,
        # Plain SGD: the update is proportional to the gradient (Adam's first step would hide its scale).
        optimizer="{_component_: torch.optim.SGD, lr: 10.0}",
        lr_scheduler="null",
    )
    before = {k: v.detach().clone() for k, v in recipe.adapter_params.items()}
    recipe.train()
    return {k: v.detach() - before[k] for k, v in recipe.adapter_params.items()}


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    """Two micro-batches of 2 give the gradient of one batch of 4, up to float32 rounding (conftest.rounding): each
    element of the SGD update may differ by the relative rounding of a sum times the update's size (its norm)."""
    small = _one_sgd_step(tmp_path, batch_size=2, accumulation=2)
    large = _one_sgd_step(tmp_path, batch_size=4, accumulation=1)
    size = torch.cat([u.flatten() for u in large.values()]).norm().item()
    bound = rounding(SUM_LENGTH) * size
    assert max(u.abs().max().item() for u in large.values()) > 100 * bound  # the step did move the adapters
    worst = max((small[name] - large[name]).abs().max().item() for name in large)
    assert worst <= bound, (worst, bound)


def test_base_weights_bit_identical_and_only_lora_trains(tmp_path):
    recipe = make_recipe(tmp_path, max_steps_per_epoch=5)
    trainable = {n for n, p in recipe._model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable), sorted(trainable)[:5]
    base_before = {k: v.clone() for k, v in recipe._model.state_dict().items() if "lora_" not in k}
    adapters_before = {k: v.detach().clone() for k, v in recipe.adapter_params.items()}

    recipe.train()

    base_after = {k: v for k, v in recipe._model.state_dict().items() if "lora_" not in k}
    assert base_before.keys() == base_after.keys()
    for k in base_before:
        assert torch.equal(base_before[k], base_after[k]), k
    assert any(not torch.equal(adapters_before[k], v) for k, v in recipe.adapter_params.items())


def test_a_step_without_trained_tokens_logs_no_loss_and_no_nan(tmp_path):
    """The first 4 prompts are longer than max_seq_len: their answers are cut off, so the first 2 steps have no
    label to train on (the last sample keeps its answer: data with no trained token at all is refused)."""
    from lora_tools.demo.assets import THINGS

    rows = [{"instruction": " ".join(THINGS * 3), "input": "", "output": "Never reached."}] * 4
    rows.append({"instruction": "Hi", "input": "", "output": "Hello."})
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    recipe = make_recipe(
        tmp_path,
        max_steps_per_epoch=2,
        shuffle=False,
        batch_size=2,
        **{
            "tokenizer.max_seq_len": 48,
            "dataset.data_files": str(data),
            "val_dataset": "null",
            "sample_prompts": "[]",
            "log_peak_memory_stats": False,
        },
    )
    before = {k: v.detach().clone() for k, v in recipe.adapter_params.items()}
    recipe.train()
    recipe.finish()
    recipe.cleanup()
    steps = logged_metrics(tmp_path / "out")
    assert sorted(steps) == [1, 2]
    for metrics in steps.values():
        assert "loss" not in metrics and metrics["trained_tokens"] == 0
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    # No trained token, no update: not even weight decay or momentum moves the adapter.
    assert all(torch.equal(before[k], v) for k, v in recipe.adapter_params.items())
