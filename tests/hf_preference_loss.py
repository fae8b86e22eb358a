"""Run in the Hugging Face environment (.venv-hf: transformers, peft, TRL; no torchtune).

    hf_preference_loss.py BASE_DIR ADAPTER_DIR IN.json OUT.json

IN.json: {"pairs": [{"prompt_ids", "chosen_ids", "rejected_ids"}, ...], "beta": b, "dpo": {...DPOConfig args}}.
With the plain calls (AutoModelForCausalLM on BASE_DIR, PEFT's PeftModel on ADAPTER_DIR), OUT.json gets the loss
and metrics of one batch of those token ids as TRL computes them:
- "dpo": TRL's DPOTrainer with the base model as its reference model (given a PEFT model alone, TRL would keep
  a copy of the loaded adapter as the reference), its compute_loss and the metrics it records;
- "orpo": TRL's ORPOTrainer (trl.experimental.orpo), its get_batch_loss_metrics.
"""

import json
import sys
import tempfile
import warnings

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

warnings.filterwarnings("ignore")


def model(base_dir: str, adapter_dir: str):
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def dpo(base_dir, adapter_dir, pairs, beta, extra) -> dict:
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    policy = model(base_dir, adapter_dir)
    out_dir = tempfile.mkdtemp()
    args = DPOConfig(output_dir=out_dir, beta=beta, report_to=[], use_cpu=True, bf16=False, **extra)
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    reference = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id or 0)(pairs)
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": loss.item(), **metrics}


def orpo(base_dir, adapter_dir, pairs, beta) -> dict:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = model(base_dir, adapter_dir)
    args = ORPOConfig(output_dir=tempfile.mkdtemp(), beta=beta, report_to=[], use_cpu=True, bf16=False)
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [p["prompt_ids"] + p[f"{side}_ids"] for p in pairs]
        labels = [[-100] * len(p["prompt_ids"]) + p[f"{side}_ids"] for p in pairs]
        width = max(len(r) for r in rows)
        batch[f"{side}_input_ids"] = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batch[f"{side}_labels"] = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    trainer.model.train()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    return {"loss": loss.item(), **metrics}


def main(base_dir: str, adapter_dir: str, in_path: str, out_path: str) -> None:
    request = json.loads(open(in_path, encoding="utf-8").read())
    pairs, beta = request["pairs"], request["beta"]
    out = {
        "dpo": dpo(base_dir, adapter_dir, pairs, beta, request.get("dpo", {})),
        "orpo": orpo(base_dir, adapter_dir, pairs, beta),
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
