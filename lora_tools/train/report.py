"""What a run shows its user besides the per-step metrics: progress, memory, sample answers, the closing summary."""

import math
import resource
from pathlib import Path

import torch
from torchtune import training, utils
from tqdm import tqdm

log = utils.get_logger("INFO")


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak GPU memory on CUDA; on the CPU, the process's peak resident memory (Linux reports KiB)."""
    if device.type == "cuda":
        return training.get_memory_stats(device=device)
    return {"peak_memory_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def progress_bar(epoch: int, done: int, total: int, shown: bool) -> tqdm:
    """One epoch's bar, in optimizer steps. Use it as a context: it is closed (its line ended) before an error
    line is printed."""
    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}", dynamic_ncols=True, disable=not shown)


def summary(
    first_step_loss: float | None,
    vocab_size: int,
    before: float | None,
    after: float | None,
    adapter: Path,
    merged: Path | None,
    preference_rows: list[tuple[str, dict]] | None = None,
) -> str:
    """The first loss against ln(vocabulary) (a random model's), held-out loss before and after (or the held-out
    preference metrics), the outputs."""
    lines = []
    if first_step_loss is not None:
        lines.append(
            f"first step loss: {first_step_loss:.4f} (ln(vocab size {vocab_size}) = {math.log(vocab_size):.4f})"
        )
    if before is not None and after is not None:
        lines.append(
            f"held-out loss: {before:.4f} before training, {after:.4f} after ({(after - before) / before:+.1%})"
        )
        lines.append(f"{'':<8}{'loss':>10}{'perplexity':>12}")
        for name, val in (("before", before), ("after", after)):
            lines.append(f"{name:<8}{val:>10.4f}{math.exp(val):>12.2f}")
    if preference_rows:
        from lora_tools.export.model_card import preference_table

        header, rows = preference_table(preference_rows)
        lines += ["held-out preference pairs:", *(" | ".join(map(str, r)) for r in [header, *rows])]
    lines.append(f"adapter (PEFT):    {adapter}")
    if merged is not None:
        lines.append(f"merged model (HF): {merged}")
    return "\n".join(lines)


def before_and_after(history: list[dict], step: int) -> list[tuple[str, dict]] | None:
    """A preference run's held-out metrics at step 0 and at ``step`` (its validations kept them in the history),
    with the loss as "loss", for the summary and the model card; None unless both were scored."""
    scored = {h["step"]: {**h, "loss": h["val_loss"]} for h in history if "preference_accuracy" in h}
    if 0 not in scored or step not in scored:
        return None
    return [("before", scored[0]), ("after", scored[step])]
