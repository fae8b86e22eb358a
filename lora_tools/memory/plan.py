"""Choosing memory settings for a budget: the fastest candidate whose traced peak (lora_tools.memory) fits, and
the report that ``python -m lora_tools.plan`` prints."""

import os

from lora_tools import memory
from lora_tools.config import settings
from lora_tools.errors import UserError

GIB = memory.GIB


def budget_for(value: str, device: str) -> int:
    """Bytes from a size, or from the GPU's free memory for ``auto``."""
    if value != "auto":
        size = settings.parse_size(value)
        if size is None:
            raise UserError(f"memory budget {value!r} is not a size; write it like 24GiB, 16GB or 8000MiB, or auto")
        return size
    import torch

    if not device.startswith("cuda"):
        raise UserError(f"a memory budget of auto needs a CUDA device (device is {device}); give a size, e.g. 24GiB")
    if not torch.cuda.is_available():
        raise UserError("a memory budget of auto reads the GPU's free memory, but no CUDA GPU is visible; give a size")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free


def rows(cfg) -> int:
    seq = cfg.tokenizer.get("max_seq_len", None)
    if seq is None:
        raise UserError("tokenizer.max_seq_len is null: the plan needs the longest row a batch can hold; set it")
    return int(seq)


def make(cfg, budget: int | None, compile_budgets: bool = False) -> memory.Plan:
    """The plan for the longest rows the config allows, every position trained: the most a step can need."""
    return memory.make_plan(cfg, budget, rows(cfg), 1.0, compile_budgets=compile_budgets)


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def choice_line(plan: memory.Plan) -> str:
    """One line: what was chosen, its predicted peak and the budget; or the smallest thing that fits."""
    n = plan.num_layers
    if plan.choice is not None:
        c = plan.choice
        return (
            f"memory plan: {c.setting.describe(n)} fits {gib(plan.budget)}: predicted peak {gib(c.peak)} "
            f"(+{gib(c.overhead)} allocator overhead); overrides: {' '.join(c.setting.overrides(n))}"
        )
    smallest = min(plan.candidates, key=lambda e: e.total)
    return (
        f"memory budget {gib(plan.budget)} is too small for this model: its smallest setting "
        f"({smallest.setting.describe(n)}) needs {gib(smallest.total)} (peak {gib(smallest.peak)} + "
        f"{gib(smallest.overhead)} overhead), {gib(smallest.total - plan.budget)} more; it fits a GPU with "
        f"{gib(smallest.total)} free using {' '.join(smallest.setting.overrides(n))}"
    )


def report(plan: memory.Plan, source: str, cfg) -> str:
    n, given = plan.num_layers, plan.given
    lines = [
        f"Memory plan for {source}: {n} layers, rows of {rows(cfg)} tokens (every position trained: the most a "
        f"step can need), {cfg.dtype}, compile {'on' if cfg.compile else 'off'}; traced on fake tensors.",
        "",
        f"As configured ({given.setting.describe(n)}): predicted peak {gib(given.peak)}, "
        f"{gib(given.total)} with allocator overhead",
    ]
    lines += [f"  {part:28s} {gib(size):>10s}" for part, size in given.parts.items()]
    lines.append(f"  {'allocator overhead':28s} {gib(given.overhead):>10s}")
    if plan.budget is None:
        lines += ["", "No budget: pass --gpu-memory 24GiB (or run where a GPU is visible) to choose settings."]
        return "\n".join(lines)
    header = f"Candidates for {gib(plan.budget)}, in order of preference (step time relative to no checkpointing):"
    lines += ["", header]
    for e in plan.candidates:
        verdict = "fits" if plan.fits(e) else f"over by {gib(e.total - plan.budget)}"
        time_ = memory.relative_step_time(e.setting, n)
        if time_ is None:
            verdict += " (speed not measured: shown, not chosen)"
        time_ = f"x{time_:.2f}" if time_ else "  ?  "
        sizes = f"peak {gib(e.peak):>9s}  needs {gib(e.total):>9s}"
        lines.append(f"  {e.setting.describe(n):55s} {time_}  {sizes}  {verdict}")
    lines += ["", choice_line(plan)]
    return "\n".join(lines)


def overrides_for_budget(checked) -> list[str]:
    """With ``memory_budget``: the overrides of the fastest memory settings that fit it, after printing one line
    (the choice, its predicted peak, the budget). Raises UserError naming the smallest setting when none fits."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("memory_budget plans one GPU holding the whole model; with torchrun pass memory_budget=null")
    budget = budget_for(checked.memory_budget, checked.device)
    result = make(checked, budget)
    line = choice_line(result)
    if result.choice is None:
        raise UserError(line)
    print(line, flush=True)
    return result.choice.setting.overrides(result.num_layers)
