"""The Hugging Face stack for bench.run: transformers + peft + TRL's SFTTrainer, same LoRA and data.

Runs in .venv-hf (peft refuses to import beside torchtune's torchao). bench.run writes the already-tokenized
samples (the same Llama 3 tokens the torchtune recipes train on) and calls:

    .venv-hf/bin/python bench/trl_sft.py --model-dir DIR --data samples.jsonl --out DIR --steps N ...

Each optimizer step appends {"step", "loss", "tokens_per_second", "trained_tokens"} to OUT/steps.jsonl.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer


class StepTimer(TrainerCallback):
    """Wall time and trained tokens of each optimizer step (data loading and optimizer included)."""

    def __init__(self, trainer_ref, log_path: Path, device: str):
        self.trainer_ref, self.log_path, self.device = trainer_ref, log_path, device
        self.t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        trainer = self.trainer_ref[0]
        tokens, loss = trainer.bench_tokens, trainer.bench_loss
        trainer.bench_tokens, trainer.bench_loss = 0, []
        record = {"step": state.global_step, "loss": sum(loss) / max(len(loss), 1)}
        record.update(tokens_per_second=tokens / seconds, trained_tokens=tokens)
        if self.device == "cuda":
            record["peak_memory_alloc"] = torch.cuda.max_memory_allocated() / 1024**3
            record["peak_memory_reserved"] = torch.cuda.max_memory_reserved() / 1024**3
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CountingSFTTrainer(SFTTrainer):
    bench_tokens, bench_loss = 0, []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.bench_tokens += int((inputs["labels"] != -100).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.bench_loss.append(float(loss))
        return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--model-dir", "--data", "--out"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--pad-id", type=int, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    # The samples arrive tokenized; the tokenizer object only supplies the pad token to the collator.
    vocab = {"<pad>": args.pad_id, "<unk>": args.pad_id - 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>", eos_token="<pad>"
    )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    config = SFTConfig(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=3e-4,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        warmup_steps=100,
        packing=True,
        packing_strategy="wrapped",
        max_length=args.seq,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch",
    )
    trainer_ref = []
    args.out.mkdir(parents=True, exist_ok=True)
    timer = StepTimer(trainer_ref, args.out / "steps.jsonl", args.device)
    trainer = CountingSFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    trainer_ref.append(trainer)
    trainer.train()


if __name__ == "__main__":
    main()
