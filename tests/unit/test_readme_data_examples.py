"""The example data files in docs/data.md and README.md ("Your own data") read as the pages say, one sample per
row; an example shown on both pages is the same file."""

import re
from pathlib import Path

import pytest
from torchtune.models.llama3 import llama3_tokenizer

from lora_tools.data.sft import conversation_dataset, instruction_dataset

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "docs" / "data.md", REPO / "README.md"]
TINY = REPO / "assets" / "tiny"
BLOCK = re.compile(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", re.S)

# file name -> (builder, the settings the page names for it, rows)
EXPECTED = {
    "chats.jsonl": (conversation_dataset, {}, 5),
    "chats.json": (conversation_dataset, {}, 2),
    "sharegpt.jsonl": (conversation_dataset, {"conversation_column": "conversations"}, 5),
    "chats.csv": (conversation_dataset, {}, 4),
    "tools.jsonl": (conversation_dataset, {}, 2),
    "sharegpt_tools.jsonl": (conversation_dataset, {"conversation_column": "conversations"}, 1),
    "alpaca.json": (instruction_dataset, {}, 3),
    "pairs.csv": (
        instruction_dataset,
        {"prompt_column": "prompt", "completion_column": "completion", "input_column": None},
        4,
    ),
}


def _examples() -> dict[str, str]:
    """Each example by name; a name shown on several pages must show the same text on each."""
    examples: dict[str, str] = {}
    for page in PAGES:
        for name, text in BLOCK.findall(page.read_text(encoding="utf-8")):
            assert examples.setdefault(name, text) == text, f"{page.name} shows another {name} than {PAGES[0].name}"
    return examples


def _tokenizer():
    return llama3_tokenizer(
        path=str(TINY / "original/tokenizer.model"), special_tokens_path=str(TINY / "special_tokens.json")
    )


def test_every_example_is_checked():
    assert set(_examples()) == {*EXPECTED, "parquet"}
    readme = dict(BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8")))
    assert set(readme) == {"chats.jsonl"}  # the README's one example, checked against docs/data.md's above


@pytest.mark.parametrize("name", EXPECTED)
def test_example_file_reads(name, tmp_path):
    builder, kwargs, rows = EXPECTED[name]
    path = tmp_path / name
    path.write_text(_examples()[name], encoding="utf-8")
    ds = builder(_tokenizer(), str(path), chat_template=str(TINY), **kwargs)
    assert len(ds) == rows
    assert all(any(label >= 0 for label in ds[i]["labels"]) for i in range(rows))


def test_parquet_recipe(tmp_path, monkeypatch):
    """The pyarrow lines turn chats.jsonl into a parquet file with the same samples."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.jsonl").write_text(_examples()["chats.jsonl"], encoding="utf-8")
    exec(_examples()["parquet"], {})
    parquet = conversation_dataset(_tokenizer(), "chats.parquet", chat_template=str(TINY))
    jsonl = conversation_dataset(_tokenizer(), "chats.jsonl", chat_template=str(TINY))
    assert [parquet[i] for i in range(5)] == [jsonl[i] for i in range(5)]


def test_readme_data_command_reads_the_example(tmp_path, monkeypatch, capsys):
    """The README's `python -m lora_tools.data ... dataset.source=chats.jsonl` line, run in-process with the tiny
    chat config in place of the 3B one (which needs the downloaded model): the override reaches the dataset, and
    the summary counts the example's 5 conversations (the tiny config's 100 validation ones are left out)."""
    import runpy
    import shlex
    import sys

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (line,) = [x for x in readme.splitlines() if x.startswith("python -m lora_tools.data ")]
    argv = shlex.split(line.split(" #")[0])[3:]
    assert "dataset.source=chats.jsonl" in argv and "--config" in argv, argv
    (tmp_path / "chats.jsonl").write_text(_examples()["chats.jsonl"], encoding="utf-8")
    argv[argv.index("--config") + 1] = "configs/tiny_chat.yaml"
    argv[argv.index("dataset.source=chats.jsonl")] = f"dataset.source={tmp_path / 'chats.jsonl'}"
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lora_tools.data", *argv, "--show", "0", "val_dataset=null"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("lora_tools.data", run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"dataset: {EXPECTED['chats.jsonl'][2]} samples," in out, out
