"""LoRA finetuning of Llama 3.2 on one device (a CUDA GPU, or the CPU for the tiny demo).

Launch from the repository root:

    tune run lora_finetune_single_device.py --config lora_finetune_single_device.yaml [key=value ...]

The class below implements torchtune's FTRecipeInterface; its methods read in the order they run: __init__ ->
setup (resume state, data, model, optimizer, schedule, logger) -> train (train_step -> forward_backward, validation,
samples, save_checkpoint) -> finish (held-out loss, samples, eval_tasks, plot, card) -> cleanup. Every component
comes from the YAML config via ``config.instantiate``; every other key is declared, typed and documented in
lora_tools.config.settings.

Checkpoints (every ``save_every_n_steps``, at the end, and on SIGINT/SIGTERM) go to output_dir/checkpoints/
step_N/: the PEFT adapter and everything needed to resume exactly; the last one of a run also holds the merged
Hugging Face model (see lora_tools.checkpoints). ``resume_from_checkpoint: True`` continues from the newest.

lora_finetune_distributed.py runs this class on every process of a torchrun job with the FSDP2 strategy.
"""

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params, validate_missing_and_unexpected_for_lora
from torchtune.recipe_interfaces import FTRecipeInterface

from lora_tools import checkpoints, memory
from lora_tools.checkpoints import model_checks, provenance
from lora_tools.config.loader import Loaded
from lora_tools.config.settings import RecipeSettings
from lora_tools.data import batching
from lora_tools.eval import harness
from lora_tools.eval.inference import PromptFormat, greedy, last_position_logits
from lora_tools.export import hf_export, model_card
from lora_tools.train import objectives, plots, reference, report, rng, tracking
from lora_tools.train.adapter_init import initial_adapter_weights
from lora_tools.train.decoder import Trunk
from lora_tools.train.launch import recipe_main
from lora_tools.train.model import prepare
from lora_tools.train.parallel import OneDevice
from lora_tools.train.steps import EarlyStopping, Steps, steps_per_epoch
from lora_tools.train.stopping import StopSignal

log = utils.get_logger("INFO")
PLOT_FILE = "training_curves.png"


class LoRAFinetuneRecipe(FTRecipeInterface):
    """LoRA on a frozen base model: only the low-rank adapters train; base weights stay bit-identical.

    What a step minimizes is the config's objective (lora_tools.train.objectives): SFT's cross-entropy, or DPO's or
    ORPO's loss on preference pairs. Either way it is a mean over every trained token (or pair) of all its
    micro-batches and processes, so ``batch_size=b, gradient_accumulation_steps=2`` updates as ``batch_size=2b``.
    """

    def __init__(self, cfg: DictConfig, settings: RecipeSettings, strategy=None) -> None:
        self._cfg, self.cfg = cfg, settings  # the config as given (for the logs), and its checked settings
        self._device = utils.get_device(device=self.cfg.device)
        self._dtype = training.get_dtype(self.cfg.dtype, device=self._device)
        self._strategy = strategy or OneDevice(self._device)
        self._provenance = provenance.provenance(cfg)
        self.seed = training.set_seed(seed=self.cfg.seed)
        # Where training stands; a resumed run takes these from its checkpoint (epochs: see Steps).
        self.global_step, self._resume_at = 0, (0, 0)
        self.first_step_loss: float | None = None
        self._early_stopping = EarlyStopping(settings.early_stopping_patience)
        self._wandb_run_id: str | None = None
        self.val_before: float | None = None  # held-out loss before training and after it
        self.val_after: float | None = None
        self._last_val: tuple[int, float] | None = None  # (step, loss) of the latest validation
        self.history: list[dict[str, float]] = []  # per step: loss, lr, val_loss (+ preference metrics); the plot's
        self.eval_result: dict | None = None  # eval_tasks: base and finetuned scores, after training
        self.last_checkpoint: Path | None = None
        self.merged_model: Path | None = None  # written into the last checkpoint at the end of a finished run
        self._built: dict[str, batching.BuiltDataset] = {}  # dataset, val_dataset: as built
        self._stopped_by_signal = False  # saved and left at once: no validation, samples or merge after it

    # ---- setup: the cheap checks and the data first, the weights last ----

    def setup(self) -> None:
        c = self.cfg
        model_checks.check_builder_matches_checkpoint(c.model, Path(c.checkpointer.checkpoint_dir))
        resume = self._load_resume_state() if c.resume_from_checkpoint else None

        self._tokenizer = config.instantiate(c.tokenizer)
        self._prompt_format = PromptFormat(c, self._tokenizer)  # sample prompts formatted as the training data
        self._eval_tasks = harness.task_manager(c.eval_tasks, []) if c.eval_tasks else None  # a typo fails now
        self._loss_fn = config.instantiate(c.loss)
        if c.compile:
            self._loss_fn = training.compile_loss(self._loss_fn)
        self._objective = objectives.build(c.objective, self._loss_fn)  # SFT with loss, or DPO / ORPO
        reference.check_start(self._objective, c.start_adapter)
        start = model_checks.starting_adapter(c.start_adapter, c.model) if c.start_adapter and not resume else None
        self._dataloader = self._setup_data(c.dataset)
        self._val_dataloader = self._setup_data(c.val_dataset, evaluation=True) if c.val_dataset else None
        self._steps_per_epoch = steps_per_epoch(len(self._dataloader), c)
        self._total_steps = c.epochs * self._steps_per_epoch
        accumulation, shown = c.gradient_accumulation_steps, self._strategy.is_main
        self._steps = Steps(self._dataloader, c.epochs, self._steps_per_epoch, accumulation, shown, *self._resume_at)
        if resume:  # a resumed cosine schedule of another length jumps to another learning rate: only on request
            checkpoints.check_same_schedule(resume, self.last_checkpoint, self._total_steps, c.allow_schedule_change)

        # The config is printed once the data is read: a mistake found above is the only line printed.
        if self._strategy.is_main:
            config.log_config(recipe_name="LoRAFinetuneRecipe", cfg=self._cfg)
        self._checkpointer = config.instantiate(c.checkpointer)
        base = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._setup_model(base, resume["adapter"] if resume else start)
        del base  # the weights now live in the model
        if reference.wanted(self._objective):  # DPO's reference log-probs: computed now, at step 0, or resumed
            scored = (self._objective, self._parts, c.batch_size, c.collate_fn, self._tokenizer.pad_id)
            reference.attach(self._built, resume, self.last_checkpoint, scored, self._strategy, self._device)
        self._optimizer = config.instantiate(c.optimizer, [p for p in self._model.parameters() if p.requires_grad])
        self._lr_scheduler = self._setup_lr_scheduler(c.lr_scheduler, self._total_steps)
        if resume:
            self._strategy.load_optimizer_state(self._model, self._optimizer, resume["optimizer"])
            self._lr_scheduler.load_state_dict(resume["lr_scheduler"])
            # Building the scheduler reset the optimizer's lr to step 0's value; put back the resumed step's lr.
            for group, lr in zip(self._optimizer.param_groups, self._lr_scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
            rng.set_state(resume["rng"][self._strategy.rank])  # last: after everything above that draws numbers
        # Last: a mistake found above leaves nothing in output_dir.
        self._metric_logger = self._strategy.metric_logger(self._build_metric_logger)
        self._metric_logger.log_config(self._cfg)
        enabled = c.profiler is not None and c.profiler.get("enabled", False)
        self._profiler = config.instantiate(c.profiler)[0] if enabled else training.DummyProfiler()

    def _load_resume_state(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, after checking that this run can continue it exactly."""
        c = self.cfg
        folder = checkpoints.latest_checkpoint(c.output_dir)
        if folder is None:
            log.warning(f"resume_from_checkpoint is True but {c.output_dir} has no checkpoint yet: starting fresh.")
            return None
        state = checkpoints.load_recipe_state(folder)
        model_checks.check_adapter_matches(c.model, state["adapter"], folder)
        checkpoints.check_same_geometry(
            state, folder, self._strategy.name, c.batch_size, c.gradient_accumulation_steps, self._strategy.world_size
        )
        changes = provenance.changes(json.loads((folder / checkpoints.PROVENANCE).read_text()), self._provenance)
        if changes:  # after the checks: a refused resume prints its error alone
            log.warning(f"Resuming from {folder} with changes since it was saved: {'; '.join(changes)}")
        log.info(f"Resuming from {folder} (step {state['global_step']}).")
        self.seed = training.set_seed(seed=state["seed"])  # the data order depends on it
        self.global_step = state["global_step"]
        self._resume_at = (state["epoch"], state["steps_done_in_epoch"])
        self.first_step_loss, self._wandb_run_id = state["first_step_loss"], state["wandb_run_id"]
        self._early_stopping.best = state["best_val"]
        self._early_stopping.evals_without_improvement = state["evals_without_improvement"]
        self.history = state.get("history", [])
        self.last_checkpoint = folder
        return state

    def _setup_data(self, section, evaluation: bool = False) -> StatefulDataLoader:
        """A dataset's batches (lora_tools.data.batching); its summary is logged before any weights load."""
        c, s, ignore = self.cfg, self._strategy, self._loss_fn.ignore_index
        name = "val_dataset" if evaluation else "dataset"
        built = self._built[name] = batching.build_dataset(section, self._tokenizer, ignore, name, self.seed)
        objectives.check_data_fits(self._objective, built, name)
        if not evaluation:  # every process: each must stop, not only the one that prints
            built.summary.require_trained_tokens(name)
        if s.is_main:
            built.summary.log(name)
        collate = batching.collate_for(built, c.collate_fn, self._tokenizer.pad_id, ignore)
        if evaluation:
            return batching.eval_dataloader(built, c.batch_size, collate, s.world_size, s.rank, ignore)
        return batching.dataloader(built, c.batch_size, collate, s.world_size, s.rank, self.seed, c.shuffle)

    def _setup_model(self, base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor] | None):
        c = self.cfg
        with training.set_default_dtype(self._dtype), self._strategy.build_device():
            model = config.instantiate(c.model)
        set_trainable_params(model, get_adapter_params(model))
        # Adapter names as the state dict has them, taken before wrappers (compile, checkpointing) rename modules.
        self._adapter_keys = set(get_adapter_params(model))
        # DoRA from the parameters themselves (a builder may enable it without a use_dora key)
        dora = any(k.endswith("magnitude") for k in self._adapter_keys)
        self._adapter_spec = dataclasses.replace(hf_export.AdapterSpec.from_model_config(c.model), dora=dora)
        given = adapter is not None  # resumed, or another run's (start_adapter)
        if not given:  # drawn from the seed alone (see lora_tools.train.adapter_init), loaded like a given one
            adapter = initial_adapter_weights(get_adapter_params(model), self.seed)

        if c.activation_checkpointing_layers and not c.enable_activation_checkpointing:
            log.warning("activation_checkpointing_layers is ignored: enable_activation_checkpointing is False")
        checkpointed = c.activation_checkpointing_layers if c.enable_activation_checkpointing else 0  # None: all
        prepare(model, c.compile, checkpointed)
        # The output layer (a 128k-wide matmul, most of a step's cost at small scale) runs only on the positions
        # that carry a label: the trunk stops at the final norm, and _forward_backward applies the head.
        self._trunk, self._head = Trunk(model), model.output
        self._strategy.shard(self._trunk)

        spec = self._adapter_spec
        # (missing, unexpected) keys of the base weights, then of the adapter: checked against the LoRA targets
        loaded = [*self._strategy.load(model, base), *self._strategy.load(model, adapter)]
        validate_missing_and_unexpected_for_lora(list(spec.attn_modules), spec.mlp, spec.output, *loaded)
        self.adapter_params = get_adapter_params(model)  # after loading: sharding and loading replace parameters
        if spec.dora and not given:  # DoRA magnitudes start from the base weights
            for m in model.modules():
                if hasattr(m, "initialize_dora_magnitude"):
                    m.initialize_dora_magnitude()
        training.validate_no_params_on_meta_device(model)
        training.validate_expected_param_dtype(self.adapter_params.items(), dtype=self._dtype)
        activations = training.get_act_offloading_ctx_manager(model, c.enable_activation_offloading)
        self._parts = objectives.ModelParts(model, self._trunk, self._head, activations)
        n_train = sum(p.numel() for p in self.adapter_params.values())
        n_all = sum(p.numel() for p in model.parameters())
        log.info(f"Model ready on {self._device.type} in {self._dtype}: {n_train:,} of {n_all:,} parameters train.")
        return model

    def _setup_lr_scheduler(self, cfg_lr_scheduler: DictConfig | None, num_training_steps: int):
        if cfg_lr_scheduler is None:  # constant learning rate
            return torch.optim.lr_scheduler.LambdaLR(self._optimizer, lambda _: 1.0)
        return config.instantiate(cfg_lr_scheduler, self._optimizer, num_training_steps=num_training_steps)

    def _build_metric_logger(self):
        """The config's logger; a resumed W&B run continues the checkpointed run (lora_tools.train.tracking)."""
        logger, self._wandb_run_id = tracking.build_logger(self.cfg.metric_logger, self._wandb_run_id)
        return logger

    # ---- training ----

    def train(self) -> None:
        """One optimizer step per turn of the loop, then what the config asks for at that step; at the end (or on
        Ctrl-C/SIGTERM, or early stopping) the last checkpoint, and the merged model unless stopped by a signal."""
        c = self.cfg
        if self.global_step == 0:
            self._before_training()
        if c.compile:
            log.info("torch.compile is on: the first step compiles the model and is slow.")
        self._optimizer.zero_grad(set_to_none=True)
        budget = memory.compile_budget(c.compile_memory_budget)  # read when the first step compiles
        with self._profiler as prof, StopSignal(announce=self._strategy.is_main) as stop, self._steps as steps, budget:
            t0 = time.perf_counter()
            for micro_batches in steps:
                self._log_step(self.train_step(micro_batches, prof), time.perf_counter() - t0)
                # A signal seen by any process stops all of them, here and only here, so that every process
                # takes the same path (and the same collectives) from now on.
                if self._strategy.sum(torch.tensor(int(stop.requested))):
                    self._stopped_by_signal = True  # save and leave quickly: no validation or samples now
                    break
                val_loss = self._validate() if self._due(c.run_val_every_n_steps) else None
                if self._due(c.sample_every_n_steps):
                    self._generate_samples()
                if val_loss is not None and self._early_stopping.should_stop(val_loss, self.global_step):
                    break
                if self._due(c.save_every_n_steps):
                    self.save_checkpoint()
                t0 = time.perf_counter()
            # Still under StopSignal: a signal now waits for the save (a second Ctrl-C quits at once).
            if self.last_checkpoint is None or self.last_checkpoint.name != checkpoints.step_name(self.global_step):
                self.save_checkpoint()
            if not self._stopped_by_signal and not c.save_adapter_weights_only:
                self._write_merged_model()

    def _before_training(self) -> None:
        """A new run: earlier checkpoints in output_dir set aside; the base's held-out loss and answers."""
        if self._strategy.is_main:
            aside = checkpoints.set_aside_earlier_run(self.cfg.output_dir)
            if aside:
                log.warning(f"{self.cfg.output_dir} held checkpoints of an earlier run: moved them to {aside}.")
        self.val_before = self._validate()
        self._early_stopping.best = math.inf if self.val_before is None else self.val_before
        if self.cfg.sample_every_n_steps:
            self._generate_samples()  # the base's answers, to read beside the trained ones

    def _due(self, every_n_steps: int | None) -> bool:
        return bool(every_n_steps) and self.global_step % every_n_steps == 0

    def _log_step(self, metrics: dict[str, float], seconds: float) -> None:
        metrics["tokens_per_second"] = metrics["trained_tokens"] / seconds
        loss = metrics.get("loss", math.nan)
        self._steps.show(step=self.global_step, loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_second']:,.0f}")
        self.history.append({"step": self.global_step, "loss": loss, "lr": metrics["lr"]})
        if self.global_step % self.cfg.log_every_n_steps == 0:
            if self.cfg.log_peak_memory_stats:
                metrics.update(report.memory_stats(self._device))
            self._metric_logger.log_dict(metrics, step=self.global_step)

    def finish(self) -> None:
        """After training: the held-out loss and sample answers of the trained model, eval_tasks scores, the plot
        and the model card. Skipped after a stop signal: the run is meant to resume, not to be judged."""
        if self._stopped_by_signal:
            log.info(f"Stopped at step {self.global_step}; resume with resume_from_checkpoint=True.")
            return
        step, loss = self._last_val or (None, None)
        self.val_after = loss if step == self.global_step else self._validate()
        if not self._due(self.cfg.sample_every_n_steps):
            self._generate_samples()  # at the end too, unless this step just sampled
        if self._eval_tasks is not None:
            self._run_eval_tasks()
        if self._strategy.is_main:
            self._write_plot_and_card()

    def _run_eval_tasks(self) -> None:
        """eval_tasks on the base (adapter off) and on the finetuned model: eval.json, W&B summary, the log."""
        c = self.cfg
        if self._strategy.world_size > 1:
            log.warning("eval_tasks runs on one device: after training run python -m lora_tools.evaluate")
            return
        settings = harness.EvalSettings(tasks=list(c.eval_tasks), limit=c.eval_limit, seed=self.seed)
        model, tokenizer, prompts = self._model, self._tokenizer, self._prompt_format
        self.eval_result = harness.score_with_and_without_adapter(model, tokenizer, prompts, settings, self._eval_tasks)
        harness.write_report(self.last_checkpoint, self.eval_result)
        tracking.update_summary(self._metric_logger, harness.summary_keys(self.eval_result))

    def _write_plot_and_card(self) -> None:
        """training_curves.png next to the logs, and the adapter folder's model card (with a copy of the plot)."""
        c = self.cfg
        logs = Path(c.metric_logger.get("log_dir") or c.output_dir)
        plot = plots.write_training_plot(self.history, logs / PLOT_FILE, title=Path(c.output_dir).name)
        shutil.copyfile(plot, self.last_checkpoint / checkpoints.ADAPTER / PLOT_FILE)
        before, after = self.val_before, self.val_after
        loss_rows = [("before", before), ("after", after)] if before is not None and after is not None else None
        rows = self.eval_result["rows"] if self.eval_result else None
        pairs = report.before_and_after(self.history, self.global_step)
        model_card.run_card(c, self.last_checkpoint, None if pairs else loss_rows, rows, PLOT_FILE, pairs)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], prof) -> dict[str, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the step's metrics."""
        # What the step's means divide by (trained tokens; pairs), over every micro-batch and process, first.
        counts = [{k: v.to(self._device) for k, v in self._objective.counts(b).items()} for b in micro_batches]
        totals, sums = objectives.summed(counts, self._strategy), []
        for batch in micro_batches:
            sums.append(self.forward_backward(batch, totals))
            prof.step()
        sums = objectives.summed(sums, self._strategy)
        if self._strategy.world_size > 1:  # FSDP averages gradients over processes; each gave its share of the sum
            training.scale_grads(self._model, torch.tensor(float(self._strategy.world_size)))
        grad_norm = self._strategy.grad_norm(self.adapter_params.values(), self.cfg.clip_grad_norm)
        n = int(totals["tokens"])
        if n > 0:  # no trained token on any process: no update (weight decay and momentum would move)
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._lr_scheduler.step()
        self.global_step += 1

        metrics = {"lr": self._optimizer.param_groups[0]["lr"], "trained_tokens": n, "grad_norm": grad_norm.item()}
        if n:
            values = self._objective.reduce(sums, totals)
            metrics["loss"] = values.pop("loss")
            metrics.update({f"train/{k}": v for k, v in values.items()})  # preference metrics, as TRL logs them
            self.first_step_loss = metrics["loss"] if self.first_step_loss is None else self.first_step_loss
        else:
            log.warning(f"Step {self.global_step} had no trained token (every label is masked): no update, no loss.")
        return metrics

    def forward_backward(self, batch: dict[str, torch.Tensor], totals: dict[str, torch.Tensor]):
        """Backward of one micro-batch's share of the step's loss; returns its metric sums (lora_tools.train
        .objectives: the loss of SFT, DPO or ORPO, which the memory plan traces too)."""
        utils.batch_to_device(batch, self._device)
        loss, sums = self._objective(self._parts, batch, totals)
        loss.backward()
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """The objective's metrics over the whole validation set: its mean loss per token (SFT) or per pair, and
        the preference metrics (None without ``val_dataset``)."""
        if self._val_dataloader is None:
            return None
        self._model.eval()
        counts, sums = [], []
        for batch in self._val_dataloader:
            utils.batch_to_device(batch, self._device)
            counts.append(self._objective.counts(batch))
            sums.append(self._objective(self._parts, batch, counts[-1])[1])
        self._model.train()
        s = self._strategy
        return self._objective.reduce(objectives.summed(sums, s), objectives.summed(counts, s))

    def _validate(self) -> float | None:
        """The validation loss at the current step, logged and kept for the plot (None without val_dataset)."""
        values = self.evaluate()
        if values is None:
            return None
        val = values.pop("loss")
        self._last_val = (self.global_step, val)
        self.history.append({"step": self.global_step, "val_loss": val, **values})  # with preference metrics
        logged = {f"eval/{k}": v for k, v in values.items()} if values else {"val_perplexity": math.exp(val)}
        self._metric_logger.log_dict({"val_loss": val, **logged}, step=self.global_step)
        return val

    @torch.no_grad()
    def _generate_samples(self, max_new_tokens: int = 48) -> None:
        """Greedy answers to the config's sample_prompts, so the log shows them change as training goes."""
        if not self.cfg.sample_prompts:
            return
        self._model.eval()
        rows, last = [], last_position_logits(self._model, self._trunk)

        def logits(*args):  # the same on every process, so all decode the same tokens
            return self._strategy.shared_logits(last(*args))

        for prompt in self.cfg.sample_prompts:
            tokens = self._prompt_format.tokens([{"role": "user", "content": prompt}])
            stop = self._tokenizer.stop_tokens
            ids = list(greedy(self._model, logits, tokens, max_new_tokens, stop, self._device))
            rows.append((prompt, self._tokenizer.decode(ids)))
        self._model.train()
        if self._strategy.is_main:
            tracking.log_samples(self._metric_logger, self.global_step, rows)

    # ---- checkpoints ----

    def save_checkpoint(self) -> None:
        """Write checkpoints/step_N/ (PEFT adapter, resume state, provenance) and point ``latest`` at it.

        Only adapter tensors are gathered and written, so a save takes seconds even for 3B: a stop signal
        (often 30 s of grace on a preemptible machine) is safe. The merged model is written at the end.
        """
        t0 = time.perf_counter()
        adapter = self._strategy.full_weights(self._model, self._adapter_keys)  # collectives when sharded
        optimizer_state = self._strategy.optimizer_state(self._model, self._optimizer)
        rng_states = self._strategy.rng_states()
        if self._strategy.is_main:
            self._write_checkpoint(adapter, optimizer_state, rng_states)
        self._strategy.barrier()  # nobody moves on (or resumes) before the checkpoint is complete
        self.last_checkpoint = checkpoints.checkpoint_folder(self.cfg.output_dir, self.global_step)
        log.info(f"Checkpoint {self.last_checkpoint} saved in {time.perf_counter() - t0:.1f}s.")

    def _write_checkpoint(self, adapter, optimizer_state, rng_states) -> None:
        state = {
            "global_step": self.global_step,
            "seed": self.seed,
            "batch_size": self.cfg.batch_size,
            "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
            "world_size": self._strategy.world_size,
            "strategy": self._strategy.name,
            "epoch": self._steps.epoch,
            "steps_done_in_epoch": self._steps.step_in_epoch,
            "total_steps": self._total_steps,
            "adapter": adapter,
            "optimizer": optimizer_state,
            "lr_scheduler": self._lr_scheduler.state_dict(),
            "rng": rng_states,
            "first_step_loss": self.first_step_loss,
            "best_val": self._early_stopping.best,
            "evals_without_improvement": self._early_stopping.evals_without_improvement,
            "wandb_run_id": self._wandb_run_id,
            "history": self.history,
        }
        if reference.wanted(self._objective):
            state["reference_logps"] = {name: built.dataset.reference for name, built in self._built.items()}
        base_dir = Path(self.cfg.checkpointer.checkpoint_dir)

        def write(folder: checkpoints.AtomicFolder) -> None:
            hf_export.write_adapter(folder, adapter, self._adapter_spec, base_dir)
            folder.write_torch(checkpoints.RECIPE_STATE, state)
            folder.write_json(checkpoints.PROVENANCE, self._provenance)

        checkpoints.save(self.cfg.output_dir, self.global_step, write, keep_last_n=self.cfg.keep_last_n)

    def _write_merged_model(self) -> None:
        """model/ in the last checkpoint: the base weights, read again from disk, with the adapter merged in."""
        if self._strategy.is_main:
            adapter = checkpoints.load_recipe_state(self.last_checkpoint)["adapter"]
            base = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
            base = hf_export.as_trained(base, self._cfg.model, self.cfg.qlora_merge_base, self._dtype)
            spec, base_dir = self._adapter_spec, Path(self.cfg.checkpointer.checkpoint_dir)
            self.merged_model = hf_export.write_merged_model(self.last_checkpoint, base, adapter, spec, base_dir)
        self._strategy.barrier()

    def cleanup(self) -> None:
        self._metric_logger.close()

    def summary(self) -> str:
        """Printed at the end of a run: what training did to the loss, and where the outputs are."""
        vocab, adapter = self._model.tok_embeddings.num_embeddings, self.last_checkpoint / checkpoints.ADAPTER
        sft = not self._objective.pairs  # a preference run shows its held-out table, not losses to compare
        first, before, after = (self.first_step_loss, self.val_before, self.val_after) if sft else (None,) * 3
        pairs = report.before_and_after(self.history, self.global_step)
        text = report.summary(first, vocab, before, after, adapter, self.merged_model, pairs)
        if self.eval_result:
            text += "\n" + harness.table(self.eval_result["rows"])
        return text


@recipe_main
def main(config: Loaded) -> None:
    """LoRA finetuning on one device. Usage: tune run lora_finetune_single_device.py --config FILE [key=value ...]"""
    recipe = LoRAFinetuneRecipe(config.cfg, config.settings)
    recipe.setup()
    recipe.train()
    recipe.finish()
    recipe.cleanup()
    print(recipe.summary(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
