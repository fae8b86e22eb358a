"""How a merged QLoRA model compares with the model that was trained (docs/export.md, "QLoRA merges").

QLoRA trains the adapter against the NF4-quantized base. This trains the tiny demo with the QLoRA builder on the
CPU, then scores three models on the demo's held-out questions (held-out loss, and greedy answers compared token
for token with the trained model's):

- trained: the NF4 base with the adapter, as training ran it;
- original: the adapter merged into the original fp32 weights (qlora_merge_base: original);
- dequantized: the adapter merged into the NF4-dequantized weights (qlora_merge_base: dequantized).

    python -m bench.qlora_merge              # writes bench/results/qlora/merge-600-steps.json
    python -m bench.qlora_merge --steps 60   # earlier in training: merge-60-steps.json
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the recipe module sits at the repository root


def heldout_loss(model, loader) -> float:
    """Mean cross-entropy per labelled token over the loader (its labels are next-token targets already)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits, labels = model(batch["tokens"]).float(), batch["labels"]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / count


def answers(model, prompts, tokenizer, max_new_tokens: int = 24) -> list[list[int]]:
    from lora_tools.eval.inference import greedy, last_position_logits
    from lora_tools.train.decoder import Trunk

    logits = last_position_logits(model, Trunk(model))
    return [list(greedy(model, logits, p, max_new_tokens, tokenizer.stop_tokens, torch.device("cpu"))) for p in prompts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, help="default: bench/results/qlora/merge-<steps>-steps.json")
    args = parser.parse_args()
    args.out = args.out or REPO / "bench" / "results" / "qlora" / f"merge-{args.steps}-steps.json"

    from torchtune import config, training
    from torchtune.models import convert_weights

    from lora_finetune_single_device import LoRAFinetuneRecipe
    from lora_tools.checkpoints import load_recipe_state, provenance
    from lora_tools.config import loader
    from lora_tools.eval.inference import PromptFormat
    from lora_tools.export import hf_export

    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", "model.quantize_base=True", f"max_steps_per_epoch={args.steps}"]
        overrides += ["eval_tasks=[]", "save_adapter_weights_only=True", "sample_every_n_steps=null"]
        loaded = loader.load(["--config", args.config, *overrides])
        cfg = loaded.cfg
        recipe = LoRAFinetuneRecipe(cfg, loaded.settings)
        recipe.setup()
        recipe.train()
        recipe.finish()
        recipe.cleanup()
        heldout = json.loads((REPO / "assets" / "tiny" / "data" / "heldout.json").read_text())
        prompt_format = PromptFormat(cfg, recipe._tokenizer)
        prompts = [prompt_format.tokens([{"role": "user", "content": e["instruction"]}]) for e in heldout]
        loader_ = recipe._val_dataloader
        trained = recipe._model.eval()
        results = {"trained": {"heldout_loss": heldout_loss(trained, loader_)}}
        reference = answers(trained, prompts, recipe._tokenizer)
        results["trained"]["answers_equal"] = len(prompts)

        hf_config = hf_export.base_config(Path(cfg.checkpointer.checkpoint_dir))
        adapter = load_recipe_state(recipe.last_checkpoint)["adapter"]
        dtype = training.get_dtype(cfg.dtype, torch.device("cpu"))
        heads = {"num_heads": hf_config["num_attention_heads"], "num_kv_heads": hf_config["num_key_value_heads"]}
        heads["dim"] = hf_config["hidden_size"]
        for merge_base in ("original", "dequantized"):
            base = recipe._checkpointer.load_checkpoint()[training.MODEL_KEY]
            base = hf_export.as_trained(base, cfg.model, merge_base, dtype)
            hf = hf_export.merged_hf_weights(base, dict(adapter), recipe._adapter_spec, hf_config)
            with training.set_default_dtype(dtype):
                plain = config.instantiate(cfg.model, quantize_base=False)
            plain.load_state_dict(convert_weights.hf_to_tune(hf, **heads), strict=False)
            for name, p in plain.named_parameters():  # the merged weights hold the update already
                if "lora_b" in name:
                    p.data.zero_()
            plain.eval()
            mine = answers(plain, prompts, recipe._tokenizer)
            results[merge_base] = {
                "heldout_loss": heldout_loss(plain, loader_),
                "answers_equal": sum(a == b for a, b in zip(mine, reference, strict=True)),
            }
    a = results["trained"]["heldout_loss"]
    for row in results.values():
        row["loss_vs_trained_pct"] = 100 * (row["heldout_loss"] - a) / a
    closer = min(("original", "dequantized"), key=lambda k: abs(results[k]["heldout_loss"] - a))
    prov = provenance.provenance(cfg)
    result = {
        "command": " ".join(["python -m bench.qlora_merge", *sys.argv[1:]]),
        "commit": prov["project_commit"],
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, CPU",
        "versions": prov["versions"],
        "config": args.config,
        "steps": args.steps,
        "heldout_questions": len(prompts),
        "models": results,
        "closer_to_trained": closer,
        "seconds": round(time.time() - started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in results.items():
        print(
            f"{name:12s} held-out loss {row['heldout_loss']:.4f} ({row['loss_vs_trained_pct']:+.2f}% vs trained), "
            f"greedy answers equal to trained: {row['answers_equal']}/{len(prompts)}"
        )
    print(f"closer to the trained model: {closer}; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
