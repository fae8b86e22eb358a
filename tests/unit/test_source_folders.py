"""Unit tier: which dataset folders preflight accepts as data (the refusals are cases in tests/test_bad_inputs.py)."""

import pytest
from omegaconf import OmegaConf

from lora_tools.config import preflight
from lora_tools.errors import UserError


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "DATA.JSONL", "table.tsv", "notes.txt", "part-0.parquet"])
def test_a_folder_with_a_data_file_is_accepted(tmp_path, name):
    (tmp_path / "README.md").write_text("about the data")
    (tmp_path / name).write_bytes(b"x")
    preflight._check_source_folder(str(tmp_path), "dataset")


@pytest.mark.parametrize("names", [["README.txt"], ["LICENSE.txt", "image.png"], []])
def test_a_folder_without_one_is_refused(tmp_path, names):
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UserError, match="is a folder without data files"):
        preflight._check_source_folder(str(tmp_path), "dataset")


def test_json_source_reads_data_dir_without_data_files(tmp_path):
    """`data_dir` names the files as well as `data_files` does: not the whole working directory."""
    cfg = OmegaConf.create({"dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json"}})
    with pytest.raises(UserError, match="dataset.data_files is not set"):
        preflight.check_datasets(cfg)
    cfg.dataset.data_dir = str(tmp_path)
    preflight.check_datasets(cfg)
