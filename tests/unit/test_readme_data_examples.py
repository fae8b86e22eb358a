"""README.md's example data files ("Train on your own data") read as the README says, one sample per row."""

import re
from pathlib import Path

import pytest
from torchtune.models.llama3 import llama3_tokenizer

from lora_tools.data.sft import conversation_dataset, instruction_dataset

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "assets" / "tiny"
BLOCK = re.compile(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", re.S)

# file name -> (builder, the settings the README names for it, rows)
EXPECTED = {
    "chats.jsonl": (conversation_dataset, {}, 5),
    "chats.json": (conversation_dataset, {}, 2),
    "sharegpt.jsonl": (conversation_dataset, {"conversation_column": "conversations"}, 5),
    "chats.csv": (conversation_dataset, {}, 4),
    "alpaca.json": (instruction_dataset, {}, 3),
    "pairs.csv": (
        instruction_dataset,
        {"prompt_column": "prompt", "completion_column": "completion", "input_column": None},
        4,
    ),
}


def _examples() -> dict[str, str]:
    return dict(BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8")))


def _tokenizer():
    return llama3_tokenizer(
        path=str(TINY / "original/tokenizer.model"), special_tokens_path=str(TINY / "special_tokens.json")
    )


def test_every_example_is_checked():
    assert set(_examples()) == {*EXPECTED, "parquet"}


@pytest.mark.parametrize("name", EXPECTED)
def test_readme_example_file_reads(name, tmp_path):
    builder, kwargs, rows = EXPECTED[name]
    path = tmp_path / name
    path.write_text(_examples()[name], encoding="utf-8")
    ds = builder(_tokenizer(), str(path), chat_template=str(TINY), **kwargs)
    assert len(ds) == rows
    assert all(any(label >= 0 for label in ds[i]["labels"]) for i in range(rows))


def test_readme_parquet_recipe(tmp_path, monkeypatch):
    """The pyarrow lines turn chats.jsonl into a parquet file with the same samples."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.jsonl").write_text(_examples()["chats.jsonl"], encoding="utf-8")
    exec(_examples()["parquet"], {})
    parquet = conversation_dataset(_tokenizer(), "chats.parquet", chat_template=str(TINY))
    jsonl = conversation_dataset(_tokenizer(), "chats.jsonl", chat_template=str(TINY))
    assert [parquet[i] for i in range(5)] == [jsonl[i] for i in range(5)]
