"""The training plot is a real, non-blank PNG of the promised size, and the model card is one the Hub's own parser
reads back, with tables that hold the numbers they were given."""

import math
import re

import pytest
from huggingface_hub import ModelCard
from matplotlib.colors import to_rgb
from PIL import Image

from lora_tools.export.model_card import model_card_text, write_model_card
from lora_tools.train.plots import COLORS, DPI, FIGSIZE, write_training_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(val_every=20, lr=True):
    """A run whose loss falls from 7 and whose learning rate warms up, validated every ``val_every`` steps."""
    records = []
    for step in range(1, 101):
        record = {"step": step, "loss": 7 * math.exp(-step / 30) + 0.1}
        if lr:
            record["lr"] = 3e-4 * min(1.0, step / 10)
        if val_every and step % val_every == 0:
            record["val_loss"] = record["loss"] + 0.2
        records.append(record)
    return records


def _pixels_of(image, color) -> int:
    """How many pixels are exactly a named matplotlib colour (the middle of a drawn line is)."""
    rgb = tuple(round(255 * channel) for channel in to_rgb(color))
    return dict((c, n) for n, c in image.getcolors(image.width * image.height)).get(rgb, 0)


def test_the_plot_is_a_png_of_the_figures_size(tmp_path):
    out = write_training_plot(_history(), tmp_path / "plots" / "training.png", title="a run")
    assert out == tmp_path / "plots" / "training.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as image:
        assert image.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    assert [p.name for p in out.parent.iterdir()] == ["training.png"]  # no temp file left behind


def test_the_plot_is_not_blank_and_draws_every_series(tmp_path):
    with Image.open(write_training_plot(_history(), tmp_path / "training.png")) as image:
        image = image.convert("RGB")
    assert len(image.getcolors(image.width * image.height)) > 5
    for series in ("loss", "val_loss", "lr"):
        assert _pixels_of(image, COLORS[series]) > 100, series


@pytest.mark.parametrize("val_every, lr", [(0, True), (20, False), (0, False)])
def test_a_missing_series_is_left_out(tmp_path, val_every, lr):
    out = write_training_plot(_history(val_every=val_every, lr=lr), tmp_path / "training.png")
    with Image.open(out) as image:
        image = image.convert("RGB")
    assert _pixels_of(image, COLORS["loss"]) > 100
    assert (_pixels_of(image, COLORS["val_loss"]) > 0) == bool(val_every)
    assert (_pixels_of(image, COLORS["lr"]) > 0) == lr


def test_the_plot_replaces_an_older_one(tmp_path):
    out = tmp_path / "training.png"
    out.write_bytes(b"an older plot")
    write_training_plot(_history(), out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


SETTINGS = [("model", "Llama-3.2-1B-Instruct"), ("LoRA rank", "16"), ("data", "a.jsonl | b.jsonl")]
LOSS_ROWS = [("before", 7.04), ("after", 2.93)]
EVAL_ROWS = [
    {
        "task": "arc_easy",
        "metric": "acc_norm",
        "base": 0.65432,
        "finetuned": 0.67891,
        "difference": 0.02459,
        "stderr_base": 0.00987,
        "stderr_finetuned": 0.00954,
    },
    {
        "task": "hellaswag",
        "metric": "acc",
        "base": 0.451,
        "finetuned": 0.4421,
        "difference": -0.0089,
        "stderr_base": 0.005,
        "stderr_finetuned": 0.0049,
    },
]


def _card(**overrides) -> str:
    args = {
        "base_model": "meta-llama/Llama-3.2-1B-Instruct",
        "datasets": ["yahma/alpaca-cleaned"],
        "license": "llama3.2",
        "title": "Llama 3.2 1B, LoRA on alpaca",
        "settings": SETTINGS,
        "loss_rows": LOSS_ROWS,
        "eval_rows": EVAL_ROWS,
        "plot": "training.png",
        "usage": "tune run generate --config generate.yaml",
    }
    return model_card_text(**args | overrides)


def _section(text: str, heading: str) -> str:
    """The body of one ``## heading`` section, up to the next one."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _table(section: str) -> list[list[str]]:
    """Rows of the first markdown table in a section, header first, separator dropped, cells unescaped."""
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            if not all(set(cell) <= set("-:") for cell in cells):
                rows.append(cells)
    return rows


def test_the_hub_reads_the_front_matter():
    data = ModelCard(_card()).data
    assert data.base_model == "meta-llama/Llama-3.2-1B-Instruct"
    assert data.library_name == "peft"
    assert data.datasets == ["yahma/alpaca-cleaned"]
    assert data.license == "llama3.2"
    assert data.pipeline_tag == "text-generation"
    assert data.tags == ["torchtune", "lora", "llama-3.2", "text-generation"]


@pytest.mark.parametrize("base_model", ['org/model:v1 "rc"', "it's: here", "- not a list", "yes", "#1"])
def test_an_awkward_base_model_survives_the_yaml(base_model):
    assert ModelCard(_card(base_model=base_model)).data.base_model == base_model


def test_empty_datasets_and_no_license_are_left_out():
    text = _card(datasets=[], license=None)
    front_matter = text.split("---\n")[1]
    assert "datasets" not in front_matter and "license" not in front_matter
    data = ModelCard(text).data
    assert data.datasets is None and data.license is None


def test_the_settings_table_holds_the_settings():
    text = _card()
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# Llama 3.2 1B, LoRA on alpaca"
    assert _table(_section(text, "Training")) == [["setting", "value"], *map(list, SETTINGS)]
    assert "![training curves](training.png)" in _section(text, "Training")


def test_the_loss_table_holds_loss_and_perplexity_at_the_printed_precision():
    section = _section(_card(), "Held-out loss")
    header, *rows = _table(section)
    assert header == ["when", "loss", "perplexity"]
    assert [when for when, _, _ in rows] == ["before", "after"]
    for (when, loss, perplexity), (_, expected) in zip(rows, LOSS_ROWS, strict=True):
        assert re.fullmatch(r"\d+\.\d{4}", loss) and re.fullmatch(r"\d+\.\d{2}", perplexity), when
        assert float(loss) == pytest.approx(expected, abs=5e-5)
        assert float(perplexity) == pytest.approx(math.exp(expected), abs=5e-3)
    change = float(re.search(r"changed by ([+-]\d+\.\d)%", section).group(1))
    assert change == pytest.approx(100 * (2.93 - 7.04) / 7.04, abs=0.05)


def test_a_diverged_loss_still_makes_a_card():
    header, *rows = _table(_section(_card(loss_rows=[("before", 2.0), ("after", 1e4)]), "Held-out loss"))
    assert rows[1] == ["after", "10000.0000", "inf"]


def test_the_eval_table_holds_scores_signed_differences_and_stderrs():
    header, *rows = _table(_section(_card(), "Evaluation"))
    assert header == ["task", "metric", "base", "finetuned", "difference"]
    for (task, metric, base, finetuned, difference), expected in zip(rows, EVAL_ROWS, strict=True):
        assert (task, metric) == (expected["task"], expected["metric"])
        for cell, value, stderr in [
            (base, expected["base"], expected["stderr_base"]),
            (finetuned, expected["finetuned"], expected["stderr_finetuned"]),
        ]:
            printed_value, printed_stderr = re.fullmatch(r"(\d\.\d{4}) ± (\d\.\d{4})", cell).groups()
            assert float(printed_value) == pytest.approx(value, abs=5e-5)
            assert float(printed_stderr) == pytest.approx(stderr, abs=5e-5)
        assert re.fullmatch(r"[+-]\d\.\d{4}", difference)
        assert float(difference) == pytest.approx(expected["difference"], abs=5e-5)


def test_sections_without_data_are_left_out():
    text = _card(loss_rows=None, eval_rows=None, plot=None)
    assert "## Held-out loss" not in text and "## Evaluation" not in text and "![" not in text
    assert "## Training" in text and "## Use" in text
    ModelCard(text)


def test_the_usage_is_fenced_even_when_it_holds_a_fence():
    usage = "```python\nfrom peft import PeftModel\n```"
    section = _section(_card(usage=usage), "Use")
    assert section.strip() == f"````\n{usage}\n````"


def test_the_card_is_written_as_readme(tmp_path):
    text = _card()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text("an older card")
    out = write_model_card(tmp_path / "adapter", text)
    assert out == tmp_path / "adapter" / "README.md"
    assert out.read_text(encoding="utf-8") == text
    assert [p.name for p in out.parent.iterdir()] == ["README.md"]
    assert ModelCard.load(out).data.library_name == "peft"
