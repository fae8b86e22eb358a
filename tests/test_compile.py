"""torch.compile on the CPU (bf16, activation checkpointing), on the recipe class itself: a run that trains,
validates, generates samples, scores eval_tasks, saves and resumes compiles each code path once."""

import logging

import torch
import torch._dynamo
from conftest import tiny_cfg
from torch._dynamo.utils import counters

from lora_finetune_single_device import LoRAFinetuneRecipe
from lora_tools.config import settings

COMPILED = {"compile": True, "dtype": "bf16", "enable_activation_checkpointing": True}
# Validation after every step, samples before training and every second step (and at the end if not then);
# the first run scores eval tasks (likelihood, generation) on the base (adapters off) and the finetuned model.
EVERYTHING = {
    "run_val_every_n_steps": 1,
    "sample_every_n_steps": 2,
    "sample_prompts": "['What color is the lemon?']",
    "eval_tasks": "[tiny_qa,tiny_qa_gen]",
    "eval_limit": 1,
    "save_adapter_weights_only": True,
}
# Graphs per run. The compiled code runs on five paths: the transformer layer's forward (one code object for all
# layers: each layer's weights are inputs of the same graph, so the count does not grow with the layers) under
# validation (no_grad), in training's first layer (its input, from the frozen embeddings, needs no gradient) and
# in the later layers; the loss's cross-entropy in validation and in training. Each path compiles once; one
# compiled before its shapes vary compiles once more, with dynamic shapes: here the validation paths (the second
# validation batch is smaller), 5 + 2. Generation and eval tasks run uncompiled (lora_tools.train.model.eager).
MAX_GRAPHS = 7


class Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def graphs_compiled(out, **overrides) -> tuple[LoRAFinetuneRecipe, int]:
    """The recipe run in this process from a fresh torch._dynamo; the number of graphs it compiled."""
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_cfg(output_dir=str(out), **{**COMPILED, **EVERYTHING, **overrides})
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, "test config"))
    recipe.setup()
    recipe.train()
    recipe.finish()
    recipe.cleanup()
    return recipe, counters["stats"]["unique_graphs"]


def test_compile_compiles_each_path_once(tmp_path):
    dynamo_log = Messages()
    logging.getLogger("torch._dynamo").addHandler(dynamo_log)
    try:
        first, first_graphs = graphs_compiled(tmp_path, epochs=2, max_steps_per_epoch=1)
        resume = {"resume_from_checkpoint": True, "allow_schedule_change": True, "eval_tasks": "[]"}
        resumed, resumed_graphs = graphs_compiled(tmp_path, epochs=3, max_steps_per_epoch=1, **resume)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(dynamo_log)
    print(f"graphs compiled: {first_graphs} (first run), {resumed_graphs} (resumed run); at most {MAX_GRAPHS}")

    # Everything ran: validation before and after, samples, eval tasks, a checkpoint and its resumption.
    assert first.val_before is not None and first.val_after is not None and first.eval_result is not None
    assert first.last_checkpoint.name == "step_0000002" and resumed.global_step == 3
    assert resumed.last_checkpoint.name == "step_0000003" and resumed.val_after is not None
    assert [m for m in dynamo_log.messages if "recompile_limit" in m] == []
    assert 0 < first_graphs <= MAX_GRAPHS and 0 < resumed_graphs <= MAX_GRAPHS
