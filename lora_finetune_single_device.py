"""LoRA finetuning of Llama 3.2 on one device (a CUDA GPU, or the CPU for the tiny demo).

Launch from the repository root:

    tune run lora_finetune_single_device.py --config lora_finetune_single_device.yaml [key=value ...]

The class below implements torchtune's FTRecipeInterface; its methods read in the order they run:
__init__ -> setup (load_checkpoint, _setup_model, _setup_optimizer, _setup_data, _setup_lr_scheduler,
_setup_profiler) -> train (-> save_checkpoint) -> cleanup. Every component comes from the YAML config via
``config.instantiate``.
"""

import math
import resource
import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    get_merged_lora_ckpt,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from lora_tools.data import build_dataset, collate_for
from lora_tools.errors import UserError
from lora_tools.launch import recipe_main

log = utils.get_logger("INFO")


class LoRAFinetuneRecipeSingleDevice(FTRecipeInterface):
    """LoRA on a frozen base model: only the low-rank adapters train; base weights stay bit-identical.

    The loss of one optimizer step is the mean over every trained token of all its micro-batches, so
    ``batch_size=b, gradient_accumulation_steps=2`` updates exactly as ``batch_size=2b`` does.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise UserError("dtype fp16 is not supported: use dtype=bf16 (GPU) or dtype=fp32 (CPU)")
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)

        self.seed = training.set_seed(seed=cfg.get("seed", None))
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.global_step = 0
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._save_adapter_weights_only = cfg.get("save_adapter_weights_only", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._compile = cfg.get("compile", False)
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._enable_activation_offloading = cfg.get("enable_activation_offloading", False)
        self.first_step_loss: float | None = None
        self.val_losses: dict[str, float] = {}

    def load_checkpoint(self, cfg_checkpointer: DictConfig) -> dict[str, Any]:
        """Read the base weights (Hugging Face safetensors) and, when resuming, adapter and recipe state."""
        self._checkpointer = config.instantiate(cfg_checkpointer, should_load_recipe_state=self._resume_from_checkpoint)
        checkpoint_dict = self._checkpointer.load_checkpoint()
        if self._resume_from_checkpoint:
            if training.ADAPTER_KEY not in checkpoint_dict:
                raise UserError(
                    f"resume_from_checkpoint is True but no adapter checkpoint was found in {self._output_dir}"
                )
            self.epochs_run = checkpoint_dict[training.EPOCHS_KEY]
            self.seed = training.set_seed(seed=checkpoint_dict[training.SEED_KEY])
        return checkpoint_dict

    def setup(self, cfg: DictConfig) -> None:
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        checkpoint_dict = self.load_checkpoint(cfg_checkpointer=cfg.checkpointer)
        self._model = self._setup_model(
            cfg_model=cfg.model,
            base_model_state_dict=checkpoint_dict[training.MODEL_KEY],
            lora_weights_state_dict=checkpoint_dict.get(training.ADAPTER_KEY) if self._resume_from_checkpoint else None,
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = self._setup_optimizer(
            cfg_optimizer=cfg.optimizer,
            opt_state_dict=checkpoint_dict.get(training.OPT_KEY) if self._resume_from_checkpoint else None,
        )
        self._loss_fn = config.instantiate(cfg.loss)
        if hasattr(self._loss_fn, "num_output_chunks"):
            # Chunked cross-entropy: the model returns its logits in chunks so they are never all in memory.
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        if self._compile:
            training.compile_loss(self._loss_fn)

        collate_fn = cfg.get("collate_fn", "torchtune.data.padded_collate_sft")
        self._dataloader = self._setup_data(cfg.dataset, cfg.get("shuffle", True), cfg.batch_size, collate_fn)
        self._val_dataloader = None
        if cfg.get("val_dataset", None) is not None:
            self._val_dataloader = self._setup_data(cfg.val_dataset, False, cfg.batch_size, collate_fn)

        # One optimizer step consumes gradient_accumulation_steps batches.
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch == 0:
            raise UserError(
                f"the dataset gives {len(self._dataloader)} batches of {cfg.batch_size}, fewer than one optimizer step "
                f"({self._gradient_accumulation_steps} batches); lower batch_size or gradient_accumulation_steps"
            )
        self.global_step = self.epochs_run * self._steps_per_epoch
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg.get("lr_scheduler", None),
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )
        self._profiler = self._setup_profiler(cfg.get("profiler", None))

    def _setup_model(
        self,
        cfg_model: DictConfig,
        base_model_state_dict: dict[str, Any],
        lora_weights_state_dict: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)

        self._lora_rank = cfg_model.lora_rank
        self._lora_alpha = cfg_model.lora_alpha
        self._lora_attn_modules = list(cfg_model.lora_attn_modules)
        self._apply_lora_to_mlp = cfg_model.get("apply_lora_to_mlp", False)
        self._apply_lora_to_output = cfg_model.get("apply_lora_to_output", False)
        self.adapter_params = get_adapter_params(model)
        set_trainable_params(model, self.adapter_params)

        if self._compile:
            training.compile_model(model)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

        base_missing, base_unexpected = model.load_state_dict(base_model_state_dict, strict=False)
        if any("magnitude" in k for k in self.adapter_params):  # DoRA magnitudes start from the base weights
            for m in model.modules():
                if hasattr(m, "initialize_dora_magnitude"):
                    m.initialize_dora_magnitude()
        lora_missing, lora_unexpected = None, None
        if lora_weights_state_dict:
            lora_missing, lora_unexpected = model.load_state_dict(lora_weights_state_dict, strict=False)
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=self._lora_attn_modules,
            apply_lora_to_mlp=self._apply_lora_to_mlp,
            apply_lora_to_output=self._apply_lora_to_output,
            base_missing=base_missing,
            base_unexpected=base_unexpected,
            lora_missing=lora_missing,
            lora_unexpected=lora_unexpected,
        )
        training.validate_expected_param_dtype(self.adapter_params.items(), dtype=self._dtype)
        self._activations_ctx = training.get_act_offloading_ctx_manager(model, self._enable_activation_offloading)
        n_train = sum(p.numel() for p in self.adapter_params.values())
        n_all = sum(p.numel() for p in model.parameters())
        log.info(f"Model ready on {self._device.type} in {self._dtype}: {n_train:,} of {n_all:,} parameters train.")
        return model

    def _setup_optimizer(self, cfg_optimizer: DictConfig, opt_state_dict: dict | None = None):
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        optimizer = config.instantiate(cfg_optimizer, trainable)
        if opt_state_dict:
            optimizer.load_state_dict(opt_state_dict)
        return optimizer

    def _setup_lr_scheduler(self, cfg_lr_scheduler: DictConfig | None, num_training_steps: int, last_epoch: int):
        if cfg_lr_scheduler is None:  # constant learning rate
            return torch.optim.lr_scheduler.LambdaLR(self._optimizer, lambda _: 1.0, last_epoch=last_epoch)
        return config.instantiate(
            cfg_lr_scheduler, self._optimizer, num_training_steps=num_training_steps, last_epoch=last_epoch
        )

    def _setup_data(self, cfg_dataset: DictConfig, shuffle: bool, batch_size: int, collate_fn: str):
        ds, packed = build_dataset(cfg_dataset, self._tokenizer, self._loss_fn.ignore_index)
        sampler = StatefulDistributedSampler(ds, num_replicas=1, rank=0, shuffle=shuffle, seed=self.seed)
        return StatefulDataLoader(
            dataset=ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_for(packed, collate_fn, self._tokenizer.pad_id, self._loss_fn.ignore_index),
            drop_last=True,
            pin_memory=self._device.type == "cuda",
        )

    def _setup_profiler(self, cfg_profiler: DictConfig | None):
        if cfg_profiler is None or not cfg_profiler.get("enabled", False):
            return training.DummyProfiler()
        cfg_profiler.setdefault("_component_", "torchtune.training.setup_torch_profiler")
        profiler, _ = config.instantiate(cfg_profiler)
        return profiler

    def _loss_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the per-token losses of one batch, and how many tokens it trains on.

        Labels arrive already shifted (see lora_tools.data), so position i's label is token i+1.
        """
        labels = batch.pop("labels")
        with self._activations_ctx:
            logits = self._model(**batch)
        n_tokens = (labels != self._loss_fn.ignore_index).sum()
        if not isinstance(logits, list):
            logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
        return self._loss_fn(logits, labels) * n_tokens, n_tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per token over the whole validation set (None without ``val_dataset``)."""
        if self._val_dataloader is None:
            return None
        self._model.eval()
        total, n = torch.zeros((), device=self._device), torch.zeros((), device=self._device)
        for batch in self._val_dataloader:
            utils.batch_to_device(batch, self._device)
            loss_sum, n_tokens = self._loss_step(batch)
            total, n = total + loss_sum, n + n_tokens
        self._model.train()
        return (total / n).item()

    def _memory_stats(self) -> dict[str, float]:
        if self._device.type == "cuda":
            return training.get_memory_stats(device=self._device)
        # CPU: the process's peak resident memory (Linux reports KiB).
        return {"peak_memory_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}

    def train(self) -> None:
        if self._compile:
            log.info("torch.compile is on: the first step compiles the model and is slow.")
        self.val_losses["before"] = self.evaluate()
        if self.val_losses["before"] is not None:
            self._metric_logger.log_dict({"val_loss": self.val_losses["before"]}, step=self.global_step)

        self._optimizer.zero_grad(set_to_none=True)
        with self._profiler as prof:
            for curr_epoch in range(self.epochs_run, self.total_epochs):
                self._dataloader.sampler.set_epoch(curr_epoch)
                pbar = tqdm(total=self._steps_per_epoch, desc=f"epoch {curr_epoch + 1}", dynamic_ncols=True)
                steps_this_epoch = 0
                running_loss, num_tokens = 0.0, 0
                t0 = time.perf_counter()
                for idx, batch in enumerate(self._dataloader):
                    utils.batch_to_device(batch, self._device)
                    loss_sum, n_tokens = self._loss_step(batch)
                    loss_sum.backward()
                    running_loss, num_tokens = running_loss + loss_sum.detach(), num_tokens + n_tokens
                    prof.step()
                    if (idx + 1) % self._gradient_accumulation_steps != 0:
                        continue

                    # One optimizer step: gradients so far are sums over tokens; make them a per-token mean.
                    training.scale_grads(self._model, 1 / num_tokens)
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self.adapter_params.values(),
                        max_norm=float(self._clip_grad_norm) if self._clip_grad_norm is not None else math.inf,
                    )
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)
                    self._lr_scheduler.step()
                    self.global_step += 1
                    steps_this_epoch += 1

                    loss = (running_loss / num_tokens).item()
                    n_trained = int(num_tokens)
                    tokens_per_second = n_trained / (time.perf_counter() - t0)
                    if self.first_step_loss is None:
                        self.first_step_loss = loss
                    pbar.update(1)
                    pbar.set_postfix(step=self.global_step, loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}")
                    if self.global_step % self._log_every_n_steps == 0:
                        metrics = {
                            "loss": loss,
                            "lr": self._optimizer.param_groups[0]["lr"],
                            "tokens_per_second": tokens_per_second,
                            "trained_tokens": n_trained,
                            "grad_norm": grad_norm.item(),
                        }
                        if self._log_peak_memory_stats:
                            metrics.update(self._memory_stats())
                        self._metric_logger.log_dict(metrics, step=self.global_step)
                    running_loss, num_tokens = 0.0, 0
                    t0 = time.perf_counter()
                    if steps_this_epoch == self._steps_per_epoch:
                        break
                pbar.close()
                self.epochs_run += 1
                self.save_checkpoint(epoch=curr_epoch)

        self.val_losses["after"] = self.evaluate()
        if self.val_losses["after"] is not None:
            self._metric_logger.log_dict({"val_loss": self.val_losses["after"]}, step=self.global_step)

    def save_checkpoint(self, epoch: int) -> None:
        """Write the PEFT adapter and (unless save_adapter_weights_only) the merged model for ``epoch``.

        Between epochs the optimizer, data position and seed are saved as well, so the run can resume.
        """
        t0 = time.perf_counter()
        ckpt_dict: dict[str, Any] = {}
        intermediate = epoch + 1 < self.total_epochs
        if intermediate:
            ckpt_dict.update(
                {
                    training.OPT_KEY: self._optimizer.state_dict(),
                    training.SEED_KEY: self.seed,
                    training.EPOCHS_KEY: self.epochs_run,
                    training.TOTAL_EPOCHS_KEY: self.total_epochs,
                    training.MAX_STEPS_KEY: self.max_steps_per_epoch,
                    training.DATALOADER_KEY: self._dataloader.state_dict(),
                }
            )
        # A copy, always: merging LoRA writes into these tensors, and on CPU .cpu() would return the live weights.
        state_dict = {k: v.detach().to("cpu", copy=True) for k, v in self._model.state_dict().items()}
        ckpt_dict[training.ADAPTER_KEY] = get_adapter_state_dict(state_dict)
        if not self._save_adapter_weights_only:
            ckpt_dict[training.MODEL_KEY] = get_merged_lora_ckpt(
                state_dict, rank=self._lora_rank, alpha=self._lora_alpha
            )
        ckpt_dict[training.ADAPTER_CONFIG] = {
            "r": self._lora_rank,
            "lora_alpha": self._lora_alpha,
            "target_modules": get_lora_module_names(
                self._lora_attn_modules, self._apply_lora_to_mlp, self._apply_lora_to_output
            ),
            "peft_type": "LORA",
        }
        self._checkpointer.save_checkpoint(
            ckpt_dict, epoch=epoch, intermediate_checkpoint=intermediate, adapter_only=self._save_adapter_weights_only
        )
        log.info(f"Checkpoint for epoch {epoch + 1} saved in {time.perf_counter() - t0:.1f}s.")

    def cleanup(self) -> None:
        self._metric_logger.close()

    def summary(self) -> str:
        """Where the outputs are, and what training did to the loss; printed at the end of a run."""
        lines = []
        vocab = getattr(self._model.tok_embeddings, "num_embeddings", None)
        if self.first_step_loss is not None and vocab:
            lines.append(
                f"first step loss: {self.first_step_loss:.4f} (ln(vocab size {vocab}) = {math.log(vocab):.4f})"
            )
        before, after = self.val_losses.get("before"), self.val_losses.get("after")
        if before is not None and after is not None:
            lines.append(
                f"held-out loss: {before:.4f} before training, {after:.4f} after ({(after - before) / before:+.1%})"
            )
        epoch_dir = f"{self._output_dir}/epoch_{self.epochs_run - 1}"
        lines.append(f"adapter (PEFT):      {epoch_dir}/adapter_model.safetensors + adapter_config.json")
        if not self._save_adapter_weights_only:
            lines.append(f"merged model (HF):   {epoch_dir}/")
        return "\n".join(lines)


@recipe_main
def main(cfg: DictConfig) -> None:
    """LoRA finetuning on one device. Usage: tune run lora_finetune_single_device.py --config FILE [key=value ...]"""
    config.log_config(recipe_name="LoRAFinetuneRecipeSingleDevice", cfg=cfg)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    print(recipe.summary(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
