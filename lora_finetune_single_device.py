"""LoRA finetuning of Llama 3.2 on one device (a CUDA GPU, or the CPU for the tiny demo).

Launch from the repository root:

    tune run lora_finetune_single_device.py --config lora_finetune_single_device.yaml [key=value ...]

The class below implements torchtune's FTRecipeInterface; its methods read in the order they run:
__init__ -> setup (load_checkpoint, _setup_model, optimizer, _setup_data, _setup_lr_scheduler,
_setup_profiler) -> train (-> save_checkpoint) -> cleanup. Every component comes from the YAML config via
``config.instantiate``.

Checkpoints (every ``save_every_n_steps``, at the end, and on SIGINT/SIGTERM) go to output_dir/checkpoints/
step_N/ with the PEFT adapter and the merged Hugging Face model in separate subfolders and everything needed
to resume exactly; ``resume_from_checkpoint: True`` continues from the newest one (see lora_tools.checkpointing).

lora_finetune_distributed.py runs this same class on every process of a torchrun job: the few steps that
change when the model is sharded are small methods here (under "One process") that it overrides.
"""

import json
import math
import os
import resource
import signal
import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.models import convert_weights
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

from lora_tools import checkpointing
from lora_tools.adapter_init import initial_adapter_weights
from lora_tools.data import EvalShard, build_dataset, collate_for
from lora_tools.errors import UserError
from lora_tools.generate import greedy, log_samples, prompt_tokens, uses_alpaca
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
        # (1, 0) here; under torchrun (the distributed recipe), the number of processes and this one's rank.
        self._world_size, self._rank = utils.get_world_size_and_rank()
        self._is_main = self._rank == 0
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)

        self.seed = training.set_seed(seed=cfg.get("seed", None))
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.global_step = 0
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._save_adapter_weights_only = cfg.get("save_adapter_weights_only", False)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._keep_last_n = cfg.get("keep_last_n", None)
        self._provenance = checkpointing.provenance(cfg)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._batch_size = cfg.batch_size
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._compile = cfg.get("compile", False)
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._enable_activation_offloading = cfg.get("enable_activation_offloading", False)
        self.first_step_loss: float | None = None
        self.val_losses: dict[str, float] = {}
        self._run_val_every_n_steps = cfg.get("run_val_every_n_steps", None)
        self._early_stopping_patience = cfg.get("early_stopping_patience", None)
        self._best_val, self._evals_without_improvement = math.inf, 0
        self._sample_prompts = list(cfg.get("sample_prompts", None) or [])
        self._sample_every_n_steps = cfg.get("sample_every_n_steps", None)
        self._alpaca_prompts = uses_alpaca(cfg)
        # Data position inside the current epoch, in optimizer steps (non-zero only when resuming mid-epoch).
        self._steps_done_in_epoch = 0
        self._stop_reason: str | None = None  # "signal" or "early stopping": finish the step, save, stop
        self._signal_seen = False  # set by the handler; becomes a stop only where all processes check it together
        self.last_checkpoint = None

    def load_checkpoint(self, cfg_checkpointer: DictConfig) -> dict[str, Any]:
        """Read the base weights (Hugging Face safetensors) and, when resuming, the newest checkpoint's state."""
        self._checkpointer = config.instantiate(cfg_checkpointer)
        checkpoint_dict = self._checkpointer.load_checkpoint()
        if not self._resume_from_checkpoint:
            return checkpoint_dict
        folder = checkpointing.latest_checkpoint(self._output_dir)
        if folder is None:
            log.warning(f"resume_from_checkpoint is True but {self._output_dir} has no checkpoint yet: starting fresh.")
            self._resume_from_checkpoint = False
            return checkpoint_dict
        state = torch.load(folder / checkpointing.RECIPE_STATE, map_location="cpu", weights_only=False)
        saved = json.loads((folder / checkpointing.PROVENANCE).read_text())
        changes = checkpointing.provenance_changes(saved, self._provenance)
        if changes:
            log.warning(f"Resuming from {folder} with changes since it was saved: {'; '.join(changes)}")
        log.info(f"Resuming from {folder} (step {state['global_step']}).")
        written_by = state.get("recipe", type(self).__name__)
        if written_by != type(self).__name__:
            raise UserError(
                f"the checkpoint in {folder} was written by {written_by}; resume it with that recipe "
                f"(their optimizer states differ), or start a new output_dir"
            )
        for key, now, how in (
            ("batch_size", self._batch_size, f"batch_size={state.get('batch_size')}"),
            ("gradient_accumulation_steps", self._gradient_accumulation_steps, "the same value"),
            ("world_size", self._world_size, f"{state.get('world_size')} processes (tune run --nproc_per_node N)"),
        ):
            if state.get(key, now) != now:
                raise UserError(
                    f"{key} is {now} but the checkpoint in {folder} was trained with {state[key]}; resume with "
                    f"{how} or start a new output_dir"
                )
        self.seed = training.set_seed(seed=state.get("seed", self.seed))  # the data order depends on it
        self.global_step = state["global_step"]
        self.epochs_run = state["epoch"]
        self._steps_done_in_epoch = state["steps_done_in_epoch"]
        self.first_step_loss = state.get("first_step_loss")
        self._best_val = state.get("best_val", self._best_val)
        self._evals_without_improvement = state.get("evals_without_improvement", 0)
        self.last_checkpoint = folder
        checkpoint_dict["resume_state"] = state
        return checkpoint_dict

    def setup(self, cfg: DictConfig) -> None:
        checkpoint_dict = self.load_checkpoint(cfg_checkpointer=cfg.checkpointer)
        resume = checkpoint_dict.get("resume_state")
        self._model = self._setup_model(
            cfg_model=cfg.model,
            base_model_state_dict=checkpoint_dict[training.MODEL_KEY],
            lora_weights_state_dict=resume["adapter"] if resume else None,
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = config.instantiate(cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad])
        if resume:
            self._load_optimizer_state(resume["optimizer"])
        self._loss_fn = config.instantiate(cfg.loss)
        if self._compile:
            self._loss_fn = training.compile_loss(self._loss_fn)

        collate_fn = cfg.get("collate_fn", "torchtune.data.padded_collate_sft")
        self._dataloader = self._setup_data(cfg.dataset, cfg.batch_size, collate_fn, shuffle=cfg.get("shuffle", True))
        self._val_dataloader = None
        cfg_val = cfg.get("val_dataset", None)  # val_dataset=null on the command line leaves only a null _component_
        if cfg_val is not None and (isinstance(cfg_val, ListConfig) or cfg_val.get("_component_", None)):
            self._val_dataloader = self._setup_data(cfg.val_dataset, cfg.batch_size, collate_fn, evaluation=True)

        # One optimizer step consumes gradient_accumulation_steps batches.
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch == 0:
            raise UserError(
                f"the dataset gives {len(self._dataloader)} batches of {cfg.batch_size}, fewer than one optimizer step "
                f"({self._gradient_accumulation_steps} batches); lower batch_size or gradient_accumulation_steps"
            )
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg.get("lr_scheduler", None), num_training_steps=self.total_epochs * self._steps_per_epoch
        )
        if resume:
            self._lr_scheduler.load_state_dict(resume["lr_scheduler"])
            # Building the scheduler reset the optimizer's lr to step 0's value; put back the resumed step's lr.
            for group, lr in zip(self._optimizer.param_groups, self._lr_scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
            # Last, after everything above that draws random numbers. One state per process (a dict before).
            rng = resume["rng"] if isinstance(resume["rng"], list) else [resume["rng"]]
            checkpointing.set_rng_state(rng[self._rank % len(rng)])
        # Last: a mistake found above leaves nothing in output_dir.
        self._metric_logger = self._setup_metric_logger(cfg.metric_logger)
        self._metric_logger.log_config(cfg)
        self._profiler = self._setup_profiler(cfg.get("profiler", None))

    def _setup_model(
        self,
        cfg_model: DictConfig,
        base_model_state_dict: dict[str, Any],
        lora_weights_state_dict: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._model_init_device():
            model = config.instantiate(cfg_model)

        self._lora_rank = cfg_model.lora_rank
        self._lora_alpha = cfg_model.lora_alpha
        self._lora_attn_modules = list(cfg_model.lora_attn_modules)
        self._apply_lora_to_mlp = cfg_model.get("apply_lora_to_mlp", False)
        self._apply_lora_to_output = cfg_model.get("apply_lora_to_output", False)
        self._lora_dropout = cfg_model.get("lora_dropout", 0.0)
        set_trainable_params(model, get_adapter_params(model))
        # A fresh adapter is drawn from the seed alone (see lora_tools.adapter_init) and loaded like a resumed
        # one. Drawn here, before wrappers (compile, checkpointing, sharding) change parameter names and shapes.
        resuming = lora_weights_state_dict is not None
        if not resuming:
            lora_weights_state_dict = initial_adapter_weights(get_adapter_params(model), self.seed)

        if self._compile:
            training.compile_model(model)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        self._shard_model(model)

        base_missing, base_unexpected = self._load_weights(model, base_model_state_dict)
        lora_missing, lora_unexpected = self._load_weights(model, lora_weights_state_dict)
        self.adapter_params = get_adapter_params(model)  # after loading: sharding and loading replace parameters
        self._is_dora = any("magnitude" in k for k in self.adapter_params)
        if self._is_dora and not resuming:  # DoRA magnitudes start from the base weights
            for m in model.modules():
                if hasattr(m, "initialize_dora_magnitude"):
                    m.initialize_dora_magnitude()
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=self._lora_attn_modules,
            apply_lora_to_mlp=self._apply_lora_to_mlp,
            apply_lora_to_output=self._apply_lora_to_output,
            base_missing=base_missing,
            base_unexpected=base_unexpected,
            lora_missing=lora_missing,
            lora_unexpected=lora_unexpected,
        )
        training.validate_no_params_on_meta_device(model)
        training.validate_expected_param_dtype(self.adapter_params.items(), dtype=self._dtype)
        self._activations_ctx = training.get_act_offloading_ctx_manager(model, self._enable_activation_offloading)
        # The output layer (a 128k-wide matmul, most of a step's cost at small scale) runs in _loss_step on the
        # positions that carry a label only: the model itself stops at the final norm.
        # (object.__setattr__ shadows the unembed method for this instance without registering a submodule, so
        # parameters and state_dict keys stay exactly as torchtune defines them.)
        self._output_layer = model.output
        object.__setattr__(model, "unembed", model.norm)
        n_train = sum(p.numel() for p in self.adapter_params.values())
        n_all = sum(p.numel() for p in model.parameters())
        log.info(f"Model ready on {self._device.type} in {self._dtype}: {n_train:,} of {n_all:,} parameters train.")
        return model

    def _setup_lr_scheduler(self, cfg_lr_scheduler: DictConfig | None, num_training_steps: int):
        if cfg_lr_scheduler is None:  # constant learning rate
            return torch.optim.lr_scheduler.LambdaLR(self._optimizer, lambda _: 1.0)
        return config.instantiate(cfg_lr_scheduler, self._optimizer, num_training_steps=num_training_steps)

    def _setup_data(
        self, cfg_dataset: DictConfig, batch_size: int, collate_fn: str, shuffle: bool = False, evaluation: bool = False
    ):
        """Training: a batch is ``batch_size x processes`` consecutive samples of one seeded shuffle, each process
        taking its share, so keeping that product gives the same batches for any number of processes.
        Evaluation: every sample once, in order, split across processes."""
        ds, packed = build_dataset(cfg_dataset, self._tokenizer, self._loss_fn.ignore_index)
        if evaluation:
            ds = EvalShard(ds, self._rank, self._world_size, self._loss_fn.ignore_index)
            sampler = StatefulDistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
        else:
            sampler = StatefulDistributedSampler(
                ds, num_replicas=self._world_size, rank=self._rank, shuffle=shuffle, seed=self.seed, drop_last=True
            )
        return StatefulDataLoader(
            dataset=ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_for(packed, collate_fn, self._tokenizer.pad_id, self._loss_fn.ignore_index),
            drop_last=not evaluation,
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
            hidden = self._model(**batch)  # [b, s, d], after the final norm
        trained = labels != self._loss_fn.ignore_index
        hidden, labels = hidden[trained], labels[trained]  # [n, d], [n]: prompt and padding cost nothing more
        n_tokens = labels.numel()
        if n_tokens == 0:  # nothing to learn from (e.g. prompts only): a zero that keeps the graph connected
            return hidden.sum() * 0.0, torch.tensor(0, device=hidden.device)
        chunks = getattr(self._loss_fn, "num_output_chunks", 0)
        if chunks:  # chunked cross-entropy: logits of one chunk at a time, upcast to fp32 inside the loss
            logits = [self._output_layer(h) for h in hidden.unsqueeze(0).chunk(chunks, dim=1)]
            loss = self._loss_fn(logits, labels.unsqueeze(0))
        else:
            loss = self._loss_fn(self._output_layer(hidden).float(), labels)
        return loss * n_tokens, torch.tensor(n_tokens, device=hidden.device)

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
        return (self._sum_over_ranks(total) / self._sum_over_ranks(n)).item()

    def _validate(self) -> float | None:
        """Validation loss at the current step: logged, remembered, and checked for early stopping."""
        val = self.evaluate()
        if val is None:
            return None
        self.val_losses[self.global_step] = val
        self._metric_logger.log_dict({"val_loss": val, "val_perplexity": math.exp(val)}, step=self.global_step)
        if val < self._best_val:
            self._best_val, self._evals_without_improvement = val, 0
        else:
            self._evals_without_improvement += 1
            if self._early_stopping_patience and self._evals_without_improvement >= self._early_stopping_patience:
                log.info(
                    f"Early stopping at step {self.global_step}: no better validation loss in "
                    f"{self._evals_without_improvement} evaluations (best {self._best_val:.4f})."
                )
                self._stop_reason = self._stop_reason or "early stopping"
        return val

    @torch.no_grad()
    def _generate_samples(self, max_new_tokens: int = 48) -> None:
        """Greedy answers to the config's sample_prompts, so the log shows them change as training goes."""
        if not self._sample_prompts:
            return
        self._model.eval()
        rows = []
        for prompt in self._sample_prompts:
            tokens = prompt_tokens(self._tokenizer, prompt, self._alpaca_prompts)
            stop = self._tokenizer.stop_tokens
            ids = list(greedy(self._model, tokens, max_new_tokens, stop, self._logits, device=self._device))
            rows.append((prompt, self._tokenizer.decode(ids)))
        self._model.train()
        log_samples(self._metric_logger, self.global_step, rows)

    def _logits(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Full logits (the model itself stops at the final norm; see _setup_model)."""
        return self._output_layer(self._model(tokens, **kwargs))

    def _memory_stats(self) -> dict[str, float]:
        if self._device.type == "cuda":
            return training.get_memory_stats(device=self._device)
        # CPU: the process's peak resident memory (Linux reports KiB).
        return {"peak_memory_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}

    def _on_stop_signal(self, signum, frame) -> None:
        if self._signal_seen:
            if signum == signal.SIGINT:  # a second Ctrl-C: leave now (a repeated SIGTERM, as torchrun sends, waits)
                os._exit(128 + signum)
            return
        self._signal_seen = True
        if self._is_main:  # os.write, not print: a handler must not re-enter a stream tqdm or logging may be using
            message = f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting "
            os.write(2, (message + "(press Ctrl-C again to quit at once)\n").encode())

    def train(self) -> None:
        if self._compile:
            log.info("torch.compile is on: the first step compiles the model and is slow.")
        if self.global_step == 0:
            self.val_losses["before"] = self._validate()

        previous_handlers = {s: signal.signal(s, self._on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._optimizer.zero_grad(set_to_none=True)
        samples_per_step = self._dataloader.batch_size * self._gradient_accumulation_steps
        with self._profiler as prof:
            for curr_epoch in range(self.epochs_run, self.total_epochs):
                self._dataloader.sampler.set_epoch(curr_epoch)
                # Resuming mid-epoch: skip the samples the checkpointed run already trained on.
                self._dataloader.sampler.load_state_dict({"yielded": self._steps_done_in_epoch * samples_per_step})
                pbar = tqdm(
                    total=self._steps_per_epoch,
                    initial=self._steps_done_in_epoch,
                    desc=f"epoch {curr_epoch + 1}",
                    dynamic_ncols=True,
                    disable=not self._is_main,
                )
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

                    # One optimizer step: gradients so far are sums over this process's tokens. FSDP averages
                    # them over processes; scaling by processes / all tokens makes them the per-token mean.
                    running_loss, num_tokens = self._sum_over_ranks(running_loss), self._sum_over_ranks(num_tokens)
                    training.scale_grads(self._model, self._world_size / num_tokens.clamp(min=1))
                    grad_norm = self._clip_grad_norm_()
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)
                    self._lr_scheduler.step()
                    self.global_step += 1
                    self._steps_done_in_epoch += 1

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

                    epoch_done = self._steps_done_in_epoch >= self._steps_per_epoch
                    if epoch_done:
                        self.epochs_run, self._steps_done_in_epoch = curr_epoch + 1, 0
                    # A signal seen by any process stops all of them, here and only here, so that every process
                    # takes the same path (and the same collectives) from now on.
                    if self._sum_over_ranks(torch.tensor(int(self._signal_seen))):
                        self._stop_reason = "signal"  # save and leave quickly: no validation or samples now
                        break
                    if self._run_val_every_n_steps and self.global_step % self._run_val_every_n_steps == 0:
                        self._validate()
                    if self._sample_every_n_steps and self.global_step % self._sample_every_n_steps == 0:
                        self._generate_samples()
                    if self._stop_reason:
                        break
                    if self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                        self.save_checkpoint(epoch=self.epochs_run)
                    t0 = time.perf_counter()
                    if epoch_done:
                        break
                pbar.close()
                if self._stop_reason:
                    break

        if self.last_checkpoint is None or self.last_checkpoint.name != checkpointing.step_name(self.global_step):
            self.save_checkpoint(epoch=self.epochs_run)
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if self._stop_reason == "signal":
            log.info(f"Stopped at step {self.global_step}; resume with resume_from_checkpoint=True.")
            return
        self.val_losses["after"] = self.val_losses.get(self.global_step) or self._validate()
        if not self._sample_every_n_steps or self.global_step % self._sample_every_n_steps:
            self._generate_samples()  # at the end too, unless this step just sampled

    def save_checkpoint(self, epoch: int) -> None:
        """Write checkpoints/step_N/: the PEFT adapter, the merged model (unless save_adapter_weights_only),
        and the recipe state for an exact resume; then point checkpoints/latest at it. Atomic: see checkpointing.
        """
        t0 = time.perf_counter()
        # Collected on every process (collectives when sharded), written by the first only.
        state_dict = self._full_state_dict()
        optimizer_state = self._optimizer_state()
        rng_states = self._rng_states()
        folder = checkpointing.checkpoint_folder(self._output_dir, self.global_step)
        if self._is_main:
            folder = self._write_checkpoint(state_dict, optimizer_state, rng_states, epoch)
        self._barrier()  # nobody moves on (or resumes) before the checkpoint is complete
        self.last_checkpoint = folder
        log.info(f"Step {self.global_step} checkpoint saved to {folder} in {time.perf_counter() - t0:.1f}s.")

    def _write_checkpoint(self, state_dict, optimizer_state, rng_states, epoch: int):
        hf = self._checkpointer._config  # the base model's config.json
        heads = dict(
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_key_value_heads"],
            dim=hf["hidden_size"],
            head_dim=hf.get("head_dim", None),
        )
        adapter = get_adapter_state_dict(state_dict)
        writer = checkpointing.CheckpointWriter(self._output_dir, self.global_step)

        writer.write_safetensors(
            "adapter/adapter_model.safetensors", checkpointing.peft_adapter_weights(adapter, **heads)
        )
        peft_config = convert_weights.tune_to_peft_adapter_config(
            {
                "r": self._lora_rank,
                "lora_alpha": self._lora_alpha,
                "target_modules": get_lora_module_names(
                    self._lora_attn_modules, self._apply_lora_to_mlp, self._apply_lora_to_output
                ),
            },
            base_model_name_or_path=self._base_model_name(),
        )
        peft_config.update(
            peft_type="LORA",
            task_type="CAUSAL_LM",
            use_dora=self._is_dora,
            lora_dropout=self._lora_dropout,
            bias="none",
        )
        writer.write_json("adapter/adapter_config.json", peft_config)

        if not self._save_adapter_weights_only:
            merged = get_merged_lora_ckpt(state_dict, rank=self._lora_rank, alpha=self._lora_alpha)
            writer.write_safetensors("model/model.safetensors", convert_weights.tune_to_hf(merged, **heads))
            for name in checkpointing.HF_SIDE_FILES:
                source = self._checkpointer._checkpoint_dir / name
                if source.is_file():
                    writer.copy(f"model/{name}", source)

        writer.write(
            checkpointing.RECIPE_STATE,
            lambda path: torch.save(
                {
                    "global_step": self.global_step,
                    "seed": self.seed,
                    "batch_size": self._batch_size,
                    "gradient_accumulation_steps": self._gradient_accumulation_steps,
                    "world_size": self._world_size,
                    "epoch": epoch,
                    "steps_done_in_epoch": self._steps_done_in_epoch,
                    "samples_consumed_in_epoch": self._steps_done_in_epoch
                    * self._dataloader.batch_size
                    * self._gradient_accumulation_steps
                    * self._world_size,
                    "adapter": adapter,
                    "optimizer": optimizer_state,
                    "lr_scheduler": self._lr_scheduler.state_dict(),
                    "rng": rng_states,
                    "first_step_loss": self.first_step_loss,
                    "best_val": self._best_val,
                    "evals_without_improvement": self._evals_without_improvement,
                    "recipe": type(self).__name__,
                },
                path,
            ),
        )
        writer.write_json(checkpointing.PROVENANCE, self._provenance)
        return writer.publish(keep_last_n=self._keep_last_n)

    def _base_model_name(self) -> str:
        """The Hub id recorded at download time (original_repo_id.json), else the base model's folder."""
        return self._checkpointer.repo_id or str(self._checkpointer._checkpoint_dir.resolve())

    # ---- One process. lora_finetune_distributed.py overrides these for a model sharded over several. ----

    def _model_init_device(self) -> torch.device:
        """Where the model is built: directly on the training device."""
        return self._device

    def _shard_model(self, model: torch.nn.Module) -> None:
        """Nothing to shard with one process."""

    def _load_weights(self, model: torch.nn.Module, state_dict: dict[str, Any]):
        """Load full tensors (base weights, or an adapter) into the model; returns (missing, unexpected) keys."""
        return model.load_state_dict(state_dict, strict=False)

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over processes: with one, the value itself."""
        return value

    def _clip_grad_norm_(self) -> torch.Tensor:
        """Clip the adapter's gradients (when clip_grad_norm is set) and return their total norm."""
        max_norm = float(self._clip_grad_norm) if self._clip_grad_norm is not None else math.inf
        return torch.nn.utils.clip_grad_norm_(self.adapter_params.values(), max_norm=max_norm)

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight as a full CPU tensor. A copy, always: merging LoRA writes into these tensors, and on
        CPU .cpu() would return the live weights."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self._model.state_dict().items()}

    def _optimizer_state(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state)

    def _rng_states(self) -> list[dict[str, Any]]:
        """The random number generators' states, one entry per process."""
        return [checkpointing.rng_state()]

    def _barrier(self) -> None:
        """Wait for every process: with one, nothing to wait for."""

    def _setup_metric_logger(self, cfg_metric_logger: DictConfig):
        return config.instantiate(cfg_metric_logger)

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
            lines.append(f"{'':<8}{'loss':>10}{'perplexity':>12}")
            for name, val in (("before", before), ("after", after)):
                lines.append(f"{name:<8}{val:>10.4f}{math.exp(val):>12.2f}")
        ckpt = self.last_checkpoint
        lines.append(f"adapter (PEFT):    {ckpt}/adapter")
        if not self._save_adapter_weights_only:
            lines.append(f"merged model (HF): {ckpt}/model")
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
