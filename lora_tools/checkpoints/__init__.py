"""Checkpoint layout on disk, atomic publishing, rotation, and finding the newest checkpoint.

    output_dir/checkpoints/
        step_0000050/
            adapter/            adapter_model.safetensors + adapter_config.json  -> PeftModel.from_pretrained
            recipe_state.pt     adapter (torchtune keys), optimizer, LR schedule, data position, RNG, step
            provenance.json     package versions, git commit, resolved config, training-data hash
            model/              the merged model (last checkpoint of a run, or `python -m lora_tools.export`)
        latest                  text file naming the newest complete checkpoint folder

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into place; only then
is ``latest`` replaced (write + fsync + rename). A kill at any moment leaves ``latest`` on a complete checkpoint.
The merged model and the adapter live in separate folders: transformers applies an adapter it finds next to a
model's weights, so one folder holding both would apply the adapter twice.
"""

import errno
import io
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lora_tools.errors import UserError

CHECKPOINTS = "checkpoints"
POINTER = "latest"
RECIPE_STATE = "recipe_state.pt"
PROVENANCE = "provenance.json"
ADAPTER = "adapter"
MERGED = "model"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# What the recipe's resume state holds (lora_finetune_single_device.py, _write_checkpoint).
STATE_KEYS = (
    "global_step",
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "strategy",
    "epoch",
    "steps_done_in_epoch",
    "total_steps",
    "adapter",
    "optimizer",
    "lr_scheduler",
    "rng",
    "first_step_loss",
    "best_val",
    "evals_without_improvement",
    "wandb_run_id",
)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_folder(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / step_name(step)


def is_complete(folder: Path) -> bool:
    return (folder / RECIPE_STATE).is_file()


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none.

    ``latest`` names it. Without a usable pointer (deleted by hand, or a folder copied in), the most recently
    written complete folder wins: the step number alone could pick a higher step left by an earlier run.
    """
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / POINTER
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if is_complete(folder):
            return folder
    complete = [p for p in root.glob("step_*") if is_complete(p)]
    return max(complete, key=lambda p: (p / RECIPE_STATE).stat().st_mtime_ns, default=None)


def resolve(output_dir: str | os.PathLike, checkpoint: Path | None = None, merged: bool = False) -> Path:
    """``checkpoint``, or the newest under output_dir, once it is known to hold the resume state and adapter
    (with ``merged``: the merged model too); otherwise one line saying what to do."""
    checkpoint = checkpoint or latest_checkpoint(output_dir)
    if checkpoint is None:
        raise UserError(f"no checkpoint under {output_dir}/{CHECKPOINTS}; train first or pass --checkpoint")
    if not is_complete(checkpoint):
        raise UserError(f"{checkpoint} is not a complete checkpoint (no {RECIPE_STATE}); pass a {CHECKPOINTS}/step_N")
    if merged and not (checkpoint / MERGED / "model.safetensors").is_file():
        raise UserError(
            f"{checkpoint} has no merged model (saved adapter-only); write it first with: python -m "
            f"lora_tools.export --config <your config> --checkpoint {checkpoint}"
        )
    return checkpoint


def set_aside_earlier_run(output_dir: str | os.PathLike) -> Path | None:
    """Move checkpoints left by an earlier run to checkpoints-before-<time>/ before a fresh run writes its own.

    A fresh run then never mixes its steps with another run's: rotation, ``latest`` and resuming see only its
    own. Returns the new folder, or None when there was nothing to move.
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir() or not any(root.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = root.with_name(f"{CHECKPOINTS}-before-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = root.with_name(f"{CHECKPOINTS}-before-{stamp}-{n}")
    os.rename(root, aside)
    return aside


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors reports a full disk as its own error type, with the OS error only in the text: give it the
    OSError(ENOSPC) every other write raises."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        if "os error 28" in str(e) or "os error 122" in str(e):
            raise OSError(errno.ENOSPC, f"{path}: {e}") from e
        raise


def write_file(path: Path, write) -> Path:
    """``write(partial_path)`` into a hidden sibling, then renamed to ``path``: a reader sees the whole file or
    none (an eval.json, a plot, a model card)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".tmp-{path.name}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


class AtomicFolder:
    """Files written into a hidden sibling folder, fsynced, then renamed to ``final`` in one step."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def write(self, relpath: str, writer: Callable[[Path], Any]) -> None:
        path = self.tmp / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        _fsync(path)

    def write_torch(self, relpath: str, obj: Any) -> None:
        """torch.save, serialised in memory first: torch's file writer reports a full disk as a RuntimeError
        without its errno; a plain file write raises OSError(ENOSPC), which the recipe turns into one line."""
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.write(relpath, lambda p: p.write_bytes(buffer.getbuffer()))

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write(relpath, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))

    def write_safetensors(self, relpath: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        self.write(relpath, lambda p: _save_safetensors(tensors, p))

    def copy(self, relpath: str, source: Path) -> None:
        self.write(relpath, lambda p: shutil.copyfile(source, p))

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def rename_into_place(self) -> Path:
        """fsync every folder, then rename. An existing ``final`` (a rerun of the same step) is renamed aside
        first and deleted only after the new folder is in place, so no moment leaves neither."""
        for folder in [self.tmp, *(p for p in self.tmp.rglob("*") if p.is_dir())]:
            _fsync(folder)
        replaced = self.final.with_name(f".replaced-{self.final.name}")
        if self.final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(self.final, replaced)
        os.rename(self.tmp, self.final)
        _fsync(self.final.parent)
        shutil.rmtree(replaced, ignore_errors=True)
        return self.final


def publish(folder: AtomicFolder, keep_last_n: int | None) -> Path:
    """Put a complete checkpoint folder in place, point ``latest`` at it, then rotate older ones out."""
    final = folder.rename_into_place()
    root = final.parent
    pointer_tmp = root / f".{POINTER}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    _fsync(pointer_tmp)
    os.replace(pointer_tmp, root / POINTER)
    _fsync(root)
    for stale in [*root.glob(".tmp-step_*"), *root.glob(".replaced-step_*")]:  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last_n:
        older = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name < final.name)
        for old in older[: max(0, len(older) - (keep_last_n - 1))]:
            shutil.rmtree(old)
    return final


def save(output_dir: str | os.PathLike, step: int, write: Callable[[AtomicFolder], None], keep_last_n: int | None):
    """Write step ``step``'s checkpoint with ``write`` and publish it. A full disk is one line for the user, with
    the partial folder removed and ``latest`` untouched."""
    folder = AtomicFolder(checkpoint_folder(output_dir, step))
    try:
        write(folder)
        return publish(folder, keep_last_n)
    except OSError as e:
        folder.discard()
        if e.errno not in DISK_FULL:
            raise
        kept = latest_checkpoint(output_dir)
        raise UserError(
            f"the disk filled up while writing the step {step} checkpoint under {Path(output_dir) / CHECKPOINTS} "
            f"(the partial folder is removed; {f'latest is still {kept.name}' if kept else 'no earlier checkpoint'})"
            "; free space, then rerun with resume_from_checkpoint=True"
        )


def load_recipe_state(folder: Path) -> dict[str, Any]:
    """The resume state: tensors and plain Python values only, so nothing in it can run code on load."""
    try:
        state = torch.load(folder / RECIPE_STATE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{folder / RECIPE_STATE} cannot be loaded safely ({reason[:120]}): it was written by an earlier "
            "version of this project, or not by it; start a new output_dir"
        )
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise UserError(
            f"{folder / RECIPE_STATE} lacks {missing[0]!r}: it was written by an earlier version of this project; "
            "start a new output_dir"
        )
    return state


def check_same_geometry(
    state: dict[str, Any], folder: Path, strategy: str, batch_size: int, accumulation: int, world_size: int
) -> None:
    """An exact resume needs the same optimizer-state layout and the same samples in every step."""
    if state["strategy"] != strategy:
        raise UserError(
            f"the checkpoint in {folder} was written by the {state['strategy']} recipe; resume it with that recipe "
            "(their optimizer states differ), or start a new output_dir"
        )
    for key, now, how in (
        ("batch_size", batch_size, f"batch_size={state['batch_size']}"),
        ("gradient_accumulation_steps", accumulation, "the same value"),
        ("world_size", world_size, f"{state['world_size']} processes (--nproc_per_node N)"),
    ):
        if state[key] != now:
            raise UserError(
                f"{key} is {now} but the checkpoint in {folder} was trained with {state[key]}; resume with {how} "
                "or start a new output_dir"
            )


def check_same_schedule(state: dict[str, Any], folder: Path, total_steps: int, allowed: bool) -> None:
    """The learning-rate schedule's length (epochs x steps per epoch) must be the checkpoint's, unless allowed."""
    if state["total_steps"] != total_steps and not allowed:
        raise UserError(
            f"epochs x steps per epoch is now {total_steps} optimizer steps, but the checkpoint in {folder} was "
            f"trained on a {state['total_steps']}-step learning-rate schedule; resume with the same epochs and "
            "max_steps_per_epoch, or pass allow_schedule_change=True"
        )
