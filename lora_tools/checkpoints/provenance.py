"""What produced a checkpoint: package versions, the project's commit, the resolved config, the data's hash.

Saved next to each checkpoint; on resume, ``changes`` says in one line what differs from the current run.
"""

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lora_tools import REPO
from lora_tools.config.settings import as_list

PACKAGES = ("torch", "torchtune", "torchao", "transformers", "peft")
# Keys that differ between a run and its resumption by design.
IGNORED_KEYS = {"resume_from_checkpoint", "allow_schedule_change"}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def data_hash(cfg_dataset: DictConfig | ListConfig) -> str:
    """sha256 of the dataset config and of every local data file it names."""
    digest = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg_dataset, resolve=True), sort_keys=True).encode())
    nodes = as_list(cfg_dataset)
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
        "versions": {p: _version(p) for p in PACKAGES},
        "project_commit": _git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data_sha256": data_hash(cfg.dataset),
    }


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's provenance and this run's."""
    out = []
    for package in sorted(saved["versions"].keys() | current["versions"].keys()):
        old, new = saved["versions"].get(package), current["versions"].get(package)
        if old != new:
            out.append(f"{package} {old} -> {new}")
    if saved["project_commit"] != current["project_commit"]:
        out.append(f"project commit {str(saved['project_commit'])[:8]} -> {str(current['project_commit'])[:8]}")
    old_cfg, new_cfg = _flatten(saved["config"]), _flatten(current["config"])
    keys = sorted(k for k in old_cfg.keys() | new_cfg.keys() if k.split(".")[0] not in IGNORED_KEYS)
    changed = [k for k in keys if old_cfg.get(k) != new_cfg.get(k)]
    if changed:
        out.append("config " + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    if saved["data_sha256"] != current["data_sha256"]:
        out.append("training data")
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}
