"""Where a run stands, in epochs and optimizer steps, the micro-batches each step trains on, and when to stop early."""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torchtune import utils

from lora_tools.errors import UserError
from lora_tools.train.report import progress_bar

log = utils.get_logger("INFO")


def steps_per_epoch(batches: int, cfg) -> int:
    """Optimizer steps in an epoch of ``batches`` micro-batches: gradient_accumulation_steps each, at most
    max_steps_per_epoch; none is one line."""
    steps = batches // cfg.gradient_accumulation_steps
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps == 0:
        raise UserError(
            f"the dataset gives {batches} batches of {cfg.batch_size}, fewer than one optimizer step "
            f"({cfg.gradient_accumulation_steps} batches); lower batch_size or gradient_accumulation_steps"
        )
    return steps


class Steps:
    """The optimizer steps of a run, epoch after epoch: each is a list of ``accumulation`` micro-batches.

    It owns the two counters a checkpoint saves, ``epoch`` (epochs finished) and ``step_in_epoch`` (optimizer
    steps done in the current one), and continues from them: a resumed run skips the samples it already trained
    on. When a step ends an epoch, the counters move to the next epoch as the step is handed out, so a checkpoint
    saved after it resumes at the next epoch. Used as a context it shows each epoch's progress bar, closed before
    an error line is printed.
    """

    def __init__(self, dataloader, epochs, steps_per_epoch, accumulation, shown: bool, epoch=0, step_in_epoch=0):
        self.dataloader, self.epochs, self.steps_per_epoch = dataloader, epochs, steps_per_epoch
        self.accumulation, self.shown = accumulation, shown
        self.epoch, self.step_in_epoch = epoch, step_in_epoch
        self._bar = None

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        while self.epoch < self.epochs:
            epoch = self.epoch
            if self.step_in_epoch < self.steps_per_epoch:  # else: resumed past the end of a now shorter epoch
                yield from self._epoch()
            if self.epoch == epoch:  # the data ran out before steps_per_epoch, or a shorter epoch was skipped
                self.epoch, self.step_in_epoch = epoch + 1, 0

    def _epoch(self) -> Iterator[list[dict[str, Any]]]:
        sampler = self.dataloader.sampler
        sampler.set_epoch(self.epoch)
        samples_per_step = self.dataloader.batch_size * self.accumulation
        sampler.load_state_dict({"yielded": self.step_in_epoch * samples_per_step})  # resumed mid-epoch: skip
        self.__exit__()
        self._bar = progress_bar(self.epoch, self.step_in_epoch, self.steps_per_epoch, self.shown)
        micro_batches = []
        for batch in self.dataloader:
            micro_batches.append(batch)
            if len(micro_batches) < self.accumulation:
                continue
            self.step_in_epoch += 1
            last = self.step_in_epoch >= self.steps_per_epoch
            if last:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            yield micro_batches
            micro_batches = []
            if last:
                return

    def show(self, **values) -> None:
        """One more step done on the bar, with values to show beside it (step, loss, tokens/s)."""
        self._bar.update(1)
        self._bar.set_postfix(**values)


@dataclass
class EarlyStopping:
    """Stop once ``patience`` validations in a row found no loss below the best so far (patience None: never).
    ``best`` starts at the loss before training; a checkpoint saves both counters."""

    patience: int | None
    best: float = math.inf
    evals_without_improvement: int = 0

    def should_stop(self, val_loss: float, step: int) -> bool:
        if val_loss < self.best:
            self.best, self.evals_without_improvement = val_loss, 0
            return False
        self.evals_without_improvement += 1
        if not self.patience or self.evals_without_improvement < self.patience:
            return False
        log.info(
            f"Early stopping at step {step}: no better validation loss in {self.evals_without_improvement} "
            f"evaluations (best {self.best:.4f})."
        )
        return True
