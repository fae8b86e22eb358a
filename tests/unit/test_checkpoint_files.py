"""Unit tier: the checkpoint writer (publish, rotation, ``latest`` and its fallback), provenance changes, and the
random-state round trip through a weights_only load. Files only; no model."""

import os
import random

import numpy as np
import pytest
import torch

from lora_tools import checkpoints
from lora_tools.checkpoints import provenance
from lora_tools.errors import UserError
from lora_tools.train import rng


def write_checkpoint(output_dir, step: int, keep_last_n=None, payload: str = "x"):
    folder = checkpoints.AtomicFolder(checkpoints.checkpoint_folder(output_dir, step))
    folder.write("payload.txt", lambda p: p.write_text(payload))
    state = {**dict.fromkeys(checkpoints.STATE_KEYS), "global_step": step}
    folder.write(checkpoints.RECIPE_STATE, lambda p: torch.save(state, p))
    return checkpoints.publish(folder, keep_last_n=keep_last_n)


def names(output_dir) -> list[str]:
    return sorted(p.name for p in (output_dir / checkpoints.CHECKPOINTS).iterdir())


def test_publish_points_latest_at_the_new_folder_and_rotates_only_older_steps(tmp_path):
    for step in (3, 6, 9, 12):
        write_checkpoint(tmp_path, step, keep_last_n=2)
    assert names(tmp_path) == ["latest", "step_0000009", "step_0000012"]
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_0000012"
    assert checkpoints.load_recipe_state(checkpoints.latest_checkpoint(tmp_path))["global_step"] == 12


def test_an_unpublished_folder_is_never_latest_and_is_cleaned_up_by_the_next_publish(tmp_path):
    write_checkpoint(tmp_path, 3)
    half = checkpoints.AtomicFolder(checkpoints.checkpoint_folder(tmp_path, 6))
    half.write("payload.txt", lambda p: p.write_text("half"))  # killed here: never renamed into place
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_0000003"
    write_checkpoint(tmp_path, 9)
    assert names(tmp_path) == ["latest", "step_0000003", "step_0000009"]


def test_republishing_a_step_replaces_it_whole(tmp_path):
    write_checkpoint(tmp_path, 4, payload="old")
    final = write_checkpoint(tmp_path, 4, payload="new")
    assert (final / "payload.txt").read_text() == "new"
    assert names(tmp_path) == ["latest", "step_0000004"]


def test_without_the_pointer_the_most_recently_written_checkpoint_wins_over_a_higher_step(tmp_path):
    write_checkpoint(tmp_path, 20)  # left by an earlier run
    newer = write_checkpoint(tmp_path, 8)
    old_time = newer.stat().st_mtime_ns - 10**9
    os.utime(checkpoints.checkpoint_folder(tmp_path, 20) / checkpoints.RECIPE_STATE, ns=(old_time, old_time))
    (tmp_path / checkpoints.CHECKPOINTS / checkpoints.POINTER).unlink()
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_0000008"


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    assert checkpoints.set_aside_earlier_run(tmp_path) is None  # nothing there
    write_checkpoint(tmp_path, 20)
    aside = checkpoints.set_aside_earlier_run(tmp_path)
    assert aside.name.startswith("checkpoints-before-") and (aside / "step_0000020" / "payload.txt").is_file()
    assert checkpoints.latest_checkpoint(tmp_path) is None
    write_checkpoint(tmp_path, 20)
    second = checkpoints.set_aside_earlier_run(tmp_path)  # twice in the same second: another name
    assert second != aside and second.is_dir() and aside.is_dir()


def test_provenance_changes_name_what_differs(tmp_path):
    data = tmp_path / "data.json"
    data.write_text("[]")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"dataset": {"data_files": str(data)}, "batch_size": 4, "resume_from_checkpoint": False})
    saved = provenance.provenance(cfg)
    assert provenance.changes(saved, provenance.provenance(cfg)) == []
    cfg.batch_size, cfg.resume_from_checkpoint = 8, True  # resume_from_checkpoint differs by design
    data.write_text('[{"a": 1}]')
    now = provenance.provenance(cfg)
    now["versions"]["torch"] = "0.0"
    assert provenance.changes(saved, now) == [
        f"torch {saved['versions']['torch']} -> 0.0",
        "config batch_size",
        "training data",
    ]


def test_random_state_survives_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng.get_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save({"rng": [state]}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["rng"][0]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.set_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class Unsafe:
    """Any class instance: unpickling it could run code."""


def test_a_pickled_object_in_recipe_state_is_refused(tmp_path):
    folder = tmp_path / "step_0000001"
    folder.mkdir()
    torch.save({"hook": Unsafe()}, folder / checkpoints.RECIPE_STATE)  # a class instance: needs the full unpickler
    with pytest.raises(UserError, match="cannot be loaded safely.*start a new output_dir"):
        checkpoints.load_recipe_state(folder)


def test_a_recipe_state_of_another_layout_is_one_line(tmp_path):
    folder = tmp_path / "step_0000001"
    folder.mkdir()
    torch.save({"global_step": 1}, folder / checkpoints.RECIPE_STATE)
    with pytest.raises(UserError, match="lacks 'seed'.*earlier version"):
        checkpoints.load_recipe_state(folder)
