"""Checkpoint layout, atomic writes, rotation, and provenance.

Each checkpoint is one folder, so that each part loads with the plain Hugging Face call and nothing else:

    output_dir/checkpoints/
        step_0000050/
            adapter/            adapter_model.safetensors + adapter_config.json  -> PeftModel.from_pretrained
            model/              config.json + model.safetensors (+ tokenizer, generation_config.json)
                                                                                 -> AutoModelForCausalLM.from_pretrained
            recipe_state.pt     optimizer, LR scheduler, data position, RNG states, step, adapter (torchtune keys)
            provenance.json     package versions, git commit, resolved config, training-data hash
        latest                  text file naming the newest complete checkpoint folder

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into place; only then
is ``latest`` replaced (write + fsync + rename). A kill at any moment leaves ``latest`` on a complete checkpoint.
The merged model and the adapter live in separate folders: transformers applies an adapter it finds next to a
model's weights, so one folder holding both would apply the adapter twice.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import save_file

CHECKPOINTS = "checkpoints"
POINTER = "latest"
RECIPE_STATE = "recipe_state.pt"
PROVENANCE = "provenance.json"
# Files copied from the base model folder into the merged model folder when present.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Test hook: kill the process right after the first file of the checkpoint for this step is written.
CRASH_ENV = "LORA_TOOLS_CRASH_DURING_CHECKPOINT_STEP"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_folder(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / step_name(step)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / POINTER
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / RECIPE_STATE).is_file():
            return folder
    # No pointer, or it names a folder that is gone: the newest complete folder (published folders are complete).
    complete = sorted(p for p in root.glob("step_*") if (p / RECIPE_STATE).is_file())
    return complete[-1] if complete else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Collects a checkpoint's files in a temporary folder, then publishes it atomically."""

    def __init__(self, output_dir: str | os.PathLike, step: int):
        self.final = checkpoint_folder(output_dir, step)
        self.root = self.final.parent
        self.tmp = self.root / f".tmp-{step_name(step)}"
        self._crash = os.environ.get(CRASH_ENV) == str(step)
        self._written = 0
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def write(self, relpath: str, writer: Callable[[Path], Any]) -> None:
        path = self.tmp / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        _fsync(path)
        self._written += 1
        if self._crash and self._written == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write(relpath, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))

    def write_safetensors(self, relpath: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        self.write(relpath, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))

    def copy(self, relpath: str, source: Path) -> None:
        self.write(relpath, lambda p: shutil.copyfile(source, p))

    def publish(self, keep_last_n: int | None) -> Path:
        for folder in [self.tmp, *(p for p in self.tmp.rglob("*") if p.is_dir())]:
            _fsync(folder)
        if self.final.exists():  # an older checkpoint of the same step (a rerun): replace it
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        _fsync(self.root)
        pointer_tmp = self.root / f".{POINTER}.tmp"
        pointer_tmp.write_text(self.final.name + "\n")
        _fsync(pointer_tmp)
        os.replace(pointer_tmp, self.root / POINTER)
        _fsync(self.root)
        for stale in self.root.glob(".tmp-step_*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        if keep_last_n:
            # Only older steps rotate out (a higher-numbered folder from an earlier run is not this run's to delete).
            older = sorted(p for p in self.root.glob("step_*") if p.is_dir() and p.name < self.final.name)
            for old in older[: max(0, len(older) - (keep_last_n - 1))]:
                shutil.rmtree(old)
        return self.final


def peft_adapter_weights(
    adapter: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int, dim: int, head_dim: int | None
) -> dict[str, torch.Tensor]:
    """torchtune adapter -> PEFT keys and layout.

    torchtune's converter permutes lora_B of q_proj/k_proj into Hugging Face's rotary row order but not the DoRA
    magnitude of those rows, so PEFT would scale the wrong rows; the magnitude gets the same permutation here.
    """
    from torchtune.models.convert_weights import tune_to_peft_adapter_weights

    head_dim = head_dim or dim // num_heads
    out = tune_to_peft_adapter_weights(adapter, num_heads, num_kv_heads, dim, head_dim)
    for key, value in out.items():
        for proj, heads in (("q_proj", num_heads), ("k_proj", num_kv_heads)):
            if key.endswith(f"{proj}.lora_magnitude_vector"):
                out[key] = value.view(heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)
    return out


# --- provenance -------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def data_hash(cfg_dataset: DictConfig | ListConfig) -> str:
    """sha256 of the dataset config and of every local data file it names."""
    digest = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg_dataset, resolve=True), sort_keys=True).encode())
    nodes = cfg_dataset if isinstance(cfg_dataset, ListConfig) else [cfg_dataset]
    for node in nodes:
        files = node.get("data_files", None)
        for name in [files] if isinstance(files, str) else list(files or []):
            path = Path(str(name))
            if path.is_file():
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def provenance(cfg: DictConfig) -> dict[str, Any]:
    return {
        "versions": {p: _version(p) for p in ("torch", "torchtune", "torchao", "transformers", "peft")},
        "project_commit": _git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data_sha256": data_hash(cfg.dataset),
    }


# Keys that legitimately differ between a run and its resumption.
_IGNORED_CONFIG_KEYS = {"resume_from_checkpoint"}


def provenance_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's provenance and this run's."""
    changes = []
    for package, old in saved.get("versions", {}).items():
        new = current["versions"].get(package)
        if old != new:
            changes.append(f"{package} {old} -> {new}")
    if saved.get("project_commit") != current["project_commit"]:
        changes.append(f"project commit {str(saved.get('project_commit'))[:8]} -> {str(current['project_commit'])[:8]}")
    old_cfg, new_cfg = _flatten(saved.get("config", {})), _flatten(current["config"])
    keys = sorted(k for k in old_cfg.keys() | new_cfg.keys() if k.split(".")[0] not in _IGNORED_CONFIG_KEYS)
    changed = [k for k in keys if old_cfg.get(k) != new_cfg.get(k)]
    if changed:
        changes.append("config " + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    if saved.get("data_sha256") != current["data_sha256"]:
        changes.append("training data")
    return changes


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


# --- RNG ----------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
