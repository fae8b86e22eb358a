"""The README.md that makes an exported adapter folder a Hugging Face model card: YAML front matter the Hub indexes
(base model, datasets, license, tags), then what was trained, how it scored, and how to use it."""

import math
import re
from pathlib import Path

import yaml

from lora_tools.checkpoints import write_file
from lora_tools.config.settings import as_list

TAGS = ["torchtune", "lora", "llama-3.2", "text-generation"]


def model_card_text(
    *,
    base_model: str,
    datasets: list[str],
    license: str | None,
    title: str,
    settings: list[tuple[str, str]],
    loss_rows: list[tuple[str, float]] | None,
    eval_rows: list[dict] | None,
    plot: str | None,
    usage: str,
    preference_rows: list[tuple[str, dict]] | None = None,
) -> str:
    """The card's text. A section with no data (None or empty) is left out rather than shown as an empty table."""
    parts = [
        _front_matter(base_model, datasets, license),
        f"# {title}",
        _description(base_model, datasets),
        _training_section(settings, plot),
    ]
    if loss_rows:
        parts.append(_loss_section(loss_rows))
    if preference_rows:
        parts.append("## Held-out preference pairs\n\n" + _table(*preference_table(preference_rows)))
    if eval_rows:
        parts.append(_eval_section(eval_rows))
    parts.append(_use_section(usage))
    return "\n\n".join(parts) + "\n"


def write_model_card(folder: Path, text: str) -> Path:
    """Write ``folder/README.md`` so that an upload or a reader never sees half a card."""
    return write_file(folder / "README.md", lambda partial: partial.write_text(text, encoding="utf-8"))


def _front_matter(base_model: str, datasets: list[str], license: str | None) -> str:
    """Dumped by PyYAML rather than formatted by hand, so an id with a colon or a quote reads back unchanged."""
    meta = {"base_model": base_model, "library_name": "peft"}
    if datasets:
        meta["datasets"] = list(datasets)
    if license is not None:
        meta["license"] = license
    meta |= {"pipeline_tag": "text-generation", "tags": list(TAGS)}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _description(base_model: str, datasets: list[str]) -> str:
    trained_on = f" on {', '.join(f'`{name}`' for name in datasets)}" if datasets else ""
    return (
        f"A LoRA adapter for `{base_model}`, finetuned with torchtune{trained_on}. Load it with PEFT on top of the "
        "base model; the settings and results below are those of the run that produced it."
    )


def _training_section(settings: list[tuple[str, str]], plot: str | None) -> str:
    parts = ["## Training"]
    if settings:
        parts.append(_table(["setting", "value"], settings))
    if plot is not None:
        parts.append(f"![training curves]({plot})")
    return "\n\n".join(parts)


def _loss_section(loss_rows: list[tuple[str, float]]) -> str:
    """Loss and perplexity per row, then the relative change from the first row to the last."""
    rows = [(when, f"{loss:.4f}", f"{_perplexity(loss):.2f}") for when, loss in loss_rows]
    parts = ["## Held-out loss", _table(["when", "loss", "perplexity"], rows)]
    (first, before), (last, after) = loss_rows[0], loss_rows[-1]
    if len(loss_rows) > 1 and before != 0:
        parts.append(f"From {first} to {last} the held-out loss changed by {(after - before) / before:+.1%}.")
    return "\n\n".join(parts)


def _perplexity(loss: float) -> float:
    """exp(loss), as infinity where that overflows (a diverged run) instead of failing the whole card."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _eval_section(eval_rows: list[dict]) -> str:
    rows = [
        (
            row["task"],
            row["metric"],
            _with_stderr(row["base"], row["stderr_base"]),
            _with_stderr(row["finetuned"], row["stderr_finetuned"]),
            f"{row['difference']:+.4f}",
        )
        for row in eval_rows
    ]
    return "## Evaluation\n\n" + _table(["task", "metric", "base", "finetuned", "difference"], rows)


def _with_stderr(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def _use_section(usage: str) -> str:
    """The usage text in a fence longer than any run of backticks inside it, so that it cannot close the fence."""
    longest = max((len(run) for run in re.findall(r"`+", usage)), default=0)
    fence = "`" * max(3, longest + 1)
    body = usage.strip("\n")  # blank lines around the text, not indentation of its first line
    return f"## Use\n\n{fence}\n{body}\n{fence}"


def _table(header: list[str], rows: list[tuple]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(_table_row(cells) for cells in lines)


def _table_row(cells) -> str:
    """A pipe or a newline in a cell would break the table: escape the one, flatten the other."""
    return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


PREFERENCE_COLUMNS = {  # metric -> column: the model's own preference first, then TRL's reward metrics
    "preference_accuracy": "chosen preferred",
    "preference_margin": "log-prob margin",
    "rewards/accuracies": "rewards/accuracies",
    "rewards/margins": "rewards/margins",
    "loss": "loss",
}


def preference_table(rows: list[tuple[str, dict]]) -> tuple[list[str], list[tuple]]:
    """(header, rows) of held-out preference metrics by moment (before / after training). "chosen preferred":
    the share of pairs whose chosen response the model gives a higher log-probability than the rejected one."""
    header = ["when", *PREFERENCE_COLUMNS.values()]
    cells = []
    for when, values in rows:
        shown = [f"{100 * values[k]:.1f}%" if k.endswith(("accuracy", "accuracies")) else f"{values[k]:+.4f}"
                 for k in PREFERENCE_COLUMNS]  # fmt: skip
        cells.append((when, *shown))
    return header, cells


# ---- the card of a training run ----

LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow"}


def dataset_names(cfg_dataset) -> list[str]:
    """Hub dataset ids named by the dataset section(s); local files are not datasets the Hub knows."""
    names = []
    for node in cfg_dataset if isinstance(cfg_dataset, list) else [cfg_dataset]:
        source = str(node.get("source", "") or "")
        if source and source not in LOCAL_LOADERS and not Path(source).exists() and "/" in source:
            names.append(source)
    return names


def run_card(cfg, checkpoint: Path, loss_rows, eval_rows, plot: str | None, preference_rows=None) -> Path:
    """README.md (and nothing else) in the checkpoint's adapter/ folder, from the run's config and results."""

    from lora_tools.export.hf_export import base_model_name

    base = base_model_name(Path(cfg.checkpointer.checkpoint_dir))
    datasets = dataset_names(as_list(cfg.dataset))
    m = cfg.model
    settings = [
        ("base model", base),
        ("LoRA rank / alpha", f"{m.get('lora_rank')} / {m.get('lora_alpha')}"),
        ("LoRA modules", ", ".join(m.get("lora_attn_modules", [])) + (", MLP" if m.get("apply_lora_to_mlp") else "")),
        ("dataset", ", ".join(datasets) or "local files"),
        ("epochs", str(cfg.epochs)),
        ("batch size x accumulation", f"{cfg.batch_size} x {cfg.gradient_accumulation_steps}"),
        ("learning rate", str(cfg.optimizer.get("lr"))),
        ("steps", checkpoint.name.removeprefix("step_").lstrip("0") or "0"),
    ]
    if cfg.objective is not None:
        arguments = ", ".join(f"{k} {v}" for k, v in cfg.objective.items() if k != "_component_")
        settings.insert(4, ("objective", f"{cfg.objective._component_.rsplit('.', 1)[-1]} ({arguments})"))
    usage = (
        "# with PEFT, on the base model\n"
        "from peft import AutoPeftModelForCausalLM\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")\n'
    )
    text = model_card_text(
        base_model=base,
        datasets=datasets,
        license="llama3.2" if "llama-3.2" in base.lower() else None,
        title=f"LoRA adapter for {base.rstrip('/').split('/')[-1]}",
        settings=settings,
        loss_rows=loss_rows,
        eval_rows=eval_rows,
        plot=plot,
        usage=usage,
        preference_rows=preference_rows,
    )
    return write_model_card(checkpoint / "adapter", text)
