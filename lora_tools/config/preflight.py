"""Checks that run before a recipe builds the model or reads any weights.

A run that dies after loading gigabytes of weights because a file, a key or a device is missing costs minutes
each try. Each check here raises UserError with one line: what is wrong, where, and the fix. None of them
writes anything (output_dir included).
"""

import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from lora_tools import REPO
from lora_tools.config import settings
from lora_tools.config.env import wandb_key_shape_error
from lora_tools.data import records
from lora_tools.errors import UserError
from lora_tools.train import tracking

# Fields each dataset builder reads from a row (before its column_map renames them).
REQUIRED_FIELDS = {
    "alpaca_dataset": ("instruction", "input", "output"),
    "alpaca_cleaned_dataset": ("instruction", "input", "output"),
}
LOCAL_SOURCES = {"json", "csv", "parquet", "text", "arrow"}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt")  # the common ones, for messages
DEMO_ASSETS = REPO / "assets" / "tiny"
# A folder named after a Llama 3.2 model, as `python -m lora_tools.download` names it.
MODEL_FOLDER = re.compile(r"Llama-3\.2-\d+B(-Instruct)?")


def run_all(cfg: DictConfig) -> None:
    """Every check, cheapest first; raises UserError at the first failure."""
    check_device(cfg)
    check_model_files(cfg)
    check_datasets(cfg)
    check_wandb(cfg)
    check_output_dir(cfg)


def download_hint(path: str) -> str:
    """The fix for a missing model folder or file at ``path``: rebuild the demo's model where it lives, download a
    Llama 3.2 model into a folder named after it, and otherwise check the path."""
    given = Path(path)
    here = given.resolve()
    if here == DEMO_ASSETS or DEMO_ASSETS in here.parents:
        return f"build it with: python -m lora_tools.tiny_assets --out {os.path.relpath(DEMO_ASSETS)}"
    for i, part in enumerate(given.parts):
        if MODEL_FOLDER.fullmatch(part):
            folder = Path(*given.parts[: i + 1])
            return f"download it with: python -m lora_tools.download meta-llama/{part} --output-dir {folder}"
    return (
        "check the path: a model fetched with python -m lora_tools.download meta-llama/Llama-3.2-3B-Instruct "
        "--output-dir DIR holds config.json, model-*.safetensors and original/tokenizer.model"
    )


def check_model_files(cfg: DictConfig) -> None:
    ckpt = cfg.checkpointer
    ckpt_dir = Path(ckpt.checkpoint_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpointer.checkpoint_dir {ckpt_dir} does not exist; {download_hint(str(ckpt_dir))}")
    files = ckpt.checkpoint_files
    names = settings.as_list(files)
    for name in names:
        if not (ckpt_dir / str(name)).is_file():
            raise UserError(f"checkpoint file {ckpt_dir / str(name)} is missing; {download_hint(str(ckpt_dir))}")
    for key in ("path", "special_tokens_path"):
        path = cfg.tokenizer.get(key, None)
        if path is not None and not Path(path).is_file():
            raise UserError(f"tokenizer.{key} {path} is missing; {download_hint(str(path))}")


def check_device(cfg: DictConfig) -> None:
    device = str(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            "device is cuda but no CUDA GPU is visible to PyTorch; pass device=cpu dtype=fp32, "
            "or try the workflow on a CPU with configs/tiny.yaml (make demo)"
        )
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun: processes on this machine
    if device.startswith("cuda") and processes > torch.cuda.device_count():
        raise UserError(
            f"--nproc_per_node {processes} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
            "start one process per GPU (--nproc_per_node <= the number of GPUs)"
        )
    if str(cfg.dtype) == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype bf16 is not supported by {torch.cuda.get_device_name()}; pass dtype=fp32")
    on_cuda = device.startswith("cuda")
    if cfg.get("enable_activation_offloading", False) and not on_cuda:
        raise UserError(
            f"enable_activation_offloading needs a CUDA device, but device is {device}; "
            "pass enable_activation_offloading=False"
        )
    if cfg.get("compile", False):
        if on_cuda and importlib.util.find_spec("triton") is None:
            raise UserError("compile is True but triton is not installed; pip install triton, or pass compile=False")
        if not on_cuda and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            raise UserError(
                f"compile is True on {device} but no C++ compiler (g++) is on PATH; install one or pass compile=False"
            )


def _dataset_cfgs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(section name, section) of every dataset: dataset and val_dataset, each a section or a list of them."""
    out = []
    for key in ("dataset", "val_dataset"):
        node = cfg.get(key, None)
        if isinstance(node, ListConfig):
            out.extend((f"{key}[{i}]", item) for i, item in enumerate(node))
        elif node is not None and node.get("_component_", None) is not None:
            out.append((key, node))
    return out


def check_datasets(cfg: DictConfig) -> None:
    for section, ds in _dataset_cfgs(cfg):
        source = str(ds.get("source", ""))
        _check_source_folder(source, section)
        if source in LOCAL_SOURCES and ds.get("data_files", None) is None and ds.get("data_dir", None) is None:
            raise UserError(
                f"{section}.source is {source} but {section}.data_files is not set, so every {source} file under "
                f"the working directory would be read; set {section}.data_files=path/to/your/file"
            )
        if source not in LOCAL_SOURCES or ds.get("data_files", None) is None:  # a Hub name, or data_dir
            continue
        files = ds.data_files
        paths = [Path(str(p)) for p in settings.as_list(files)]
        for path in paths:
            if not path.is_file():
                raise UserError(f"dataset file {path} does not exist; check {section}.data_files")
            if path.stat().st_size == 0:
                raise UserError(f"dataset file {path} is empty; add samples to it or fix {section}.data_files")
            if source in ("json", "csv", "text"):
                records.read_text(path)
        if source != "json":
            continue
        builder = str(ds.get("_component_", "")).rsplit(".", 1)[-1]
        for path in paths:
            rows = [row for _, row in records.json_rows(path, ds.get("field", None))]
            if not rows:
                raise UserError(f"dataset file {path} has no rows; add samples to it or fix {section}.data_files")
            if builder in REQUIRED_FIELDS:
                _check_fields(path, rows, builder, dict(ds.get("column_map", None) or {}))
            elif builder == "chat_dataset":
                _check_conversations(path, rows, section, ds)


def _check_source_folder(source: str, section: str) -> None:
    """A folder given as the source must hold data files (datasets would read a README.txt as text data)."""
    folder = Path(source)
    if not source or source in LOCAL_SOURCES or not folder.is_dir():
        return
    if not any(_is_data_file(p) for p in folder.rglob("*") if p.is_file()):
        held = sorted(p.name for p in folder.iterdir())[:5]
        holds = f"it holds only {', '.join(held)}" if held else "it is empty"
        raise UserError(
            f"{section}.source {source} is a folder without data files ({', '.join(DATA_SUFFIXES)}, not counting a "
            f"README; {holds}); put your data files there or point {section}.source at one file"
        )


def _is_data_file(path: Path) -> bool:
    """A file datasets reads as rows of text data (by any of its suffixes, e.g. rows.jsonl.gz); a README or
    LICENSE is not."""
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    if path.name.upper().startswith(("README", "LICENSE")):
        return False
    return any(_EXTENSION_TO_MODULE.get(suffix.lower(), ("",))[0] in LOCAL_SOURCES for suffix in path.suffixes)


def _check_fields(path: Path, rows: list, builder: str, column_map: dict) -> None:
    fields = [column_map.get(f, f) for f in REQUIRED_FIELDS[builder]]
    for number, row in enumerate(rows, start=1):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise UserError(
                f"dataset file {path}, row {number}: missing field '{missing[0]}' that {builder} needs "
                f"(each row needs {', '.join(fields)}); fix the row or set dataset.column_map"
            )


# chat_dataset: the keys of each message, and the roles torchtune maps, per conversation_style.
CHAT_STYLES = {
    "sharegpt": (("from", "value"), ("system", "human", "gpt")),
    "openai": (("role", "content"), ("system", "user", "assistant", "ipython")),
}


def _check_conversations(path: Path, rows: list, section: str, ds: DictConfig) -> None:
    """Rows of a chat_dataset file: a list of messages each, with the keys and roles its style names."""
    column = str(ds.get("conversation_column", ""))
    style = str(ds.get("conversation_style", ""))
    if style not in CHAT_STYLES:
        return  # settings.parse refuses other styles
    (role_key, content_key), roles = CHAT_STYLES[style]
    for number, row in enumerate(rows, start=1):
        where = f"dataset file {path}, row {number}"
        if not isinstance(row, dict) or column not in row:
            raise UserError(
                f"{where}: no '{column}' column ({section}.conversation_column); "
                f"fix the row or set {section}.conversation_column to the column that holds the messages"
            )
        messages = row[column]
        if not isinstance(messages, list):
            raise UserError(f"{where}: '{column}' is not a list of messages; fix the row")
        for m, message in enumerate(messages, start=1):
            for key in (role_key, content_key):
                if not isinstance(message, dict) or key not in message:
                    raise UserError(
                        f"{where}, message {m}: no '{key}' ({style} messages have '{role_key}' and "
                        f"'{content_key}'); fix the row or set {section}.conversation_style"
                    )
            if message[role_key] not in roles:
                shown = str(message[role_key])[:30]
                raise UserError(
                    f"{where}, message {m}: unknown role '{shown}' ({style} roles: {', '.join(roles)}); fix the row"
                )


def check_wandb(cfg: DictConfig) -> None:
    if not tracking.uses_wandb(cfg.metric_logger):
        return
    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled", "dryrun"):
        return
    key = os.environ.get("WANDB_API_KEY", "").strip()
    if key:
        error = wandb_key_shape_error(key)  # a short key would end in wandb's traceback at the first log
        if error:
            raise error
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
        return  # logged in earlier with `wandb login`
    raise UserError(
        "metric_logger is W&B but no WANDB_API_KEY is set; put it in .env and check it with `python wb.py`, "
        "or set WANDB_MODE=offline to log locally and `wandb sync` later"
    )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def estimated_output_bytes(cfg: DictConfig) -> int:
    """The least disk a run needs to finish: one step checkpoint (the adapter in the PEFT file and in the resume
    state, and AdamW's two moments: four adapter-sized tensors) and, unless save_adapter_weights_only, the merged
    model, as large as the base files. A disk that fills later (more checkpoints kept) is one line then."""
    from torchtune.modules.peft import get_adapter_params

    from lora_tools.train.model import meta_model

    adapter_numel = sum(p.numel() for p in get_adapter_params(meta_model(cfg.model)).values())
    needed = 4 * adapter_numel * (2 if str(cfg.dtype) == "bf16" else 4)
    if not cfg.get("save_adapter_weights_only", False):
        ckpt_dir = Path(cfg.checkpointer.checkpoint_dir)
        files = cfg.checkpointer.checkpoint_files
        names = settings.as_list(files)
        needed += sum((ckpt_dir / str(n)).stat().st_size for n in names)
    return needed


def check_output_dir(cfg: DictConfig) -> None:
    out = Path(str(cfg.output_dir))
    ancestor = _existing_ancestor(out)
    if not ancestor.is_dir():
        raise UserError(f"output_dir {out} cannot be created: {ancestor} is a file; choose another output_dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out} is not writable ({ancestor} is read-only); choose another output_dir")
    needed = estimated_output_bytes(cfg)
    free = shutil.disk_usage(ancestor).free
    if free < needed:
        raise UserError(
            f"not enough disk for output_dir {out}: checkpoints need about {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free space, choose another output_dir, or set save_adapter_weights_only=True"
        )
