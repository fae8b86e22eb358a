"""The `vllm serve` lines for a checkpoint: the base model with its adapter (vLLM's LoRA), and the merged model.

Both use the chat template training rendered with, written next to the adapter with the training date set
inside it (``chat_template.jinja``), so a plain chat request is formatted as the training data was: vLLM would
otherwise pass today's date to templates that print one.
"""

import re
import shlex
from pathlib import Path

from lora_tools import checkpoints
from lora_tools.export.hf_export import AdapterSpec
from lora_tools.train.model import is_qlora

TEMPLATE_FILE = "chat_template.jinja"
VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# The adapter ranks vLLM's --max-lora-rank accepts (vllm/config/lora.py, 0.32)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_name(output_dir: str) -> str:
    """The name requests give for the adapter: the run's folder name, in the characters model names use."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(output_dir).name) or "adapter"


def write_template(checkpoint: Path, template: str) -> Path:
    path = checkpoint / checkpoints.ADAPTER / TEMPLATE_FILE
    path.write_text(template, encoding="utf-8")
    return path


def serve_lines(cfg, dtype: str, checkpoint: Path, template: Path) -> tuple[list[str], list[str]]:
    """(commands, notes): ``vllm serve`` for base + adapter (not for DoRA, which vLLM lacks, nor QLoRA, trained on
    another base) and for the merged model (when the checkpoint has one), and what to know about them."""
    spec = AdapterSpec.from_model_config(cfg.model)
    common = ["--chat-template", str(template), "--dtype", VLLM_DTYPES[dtype]]
    commands, notes = [], []
    if spec.dora:
        notes.append("vLLM does not serve DoRA adapters; serve the merged model")
    elif is_qlora(cfg.model):
        notes.append(
            "QLoRA: vLLM would apply the adapter to the full-precision base, not the NF4 one it was trained on "
            "(docs/export.md#qlora-merges); serve the merged model"
        )
    else:
        rank = next((r for r in VLLM_LORA_RANKS if r >= spec.rank), spec.rank)
        adapter = checkpoint / checkpoints.ADAPTER
        base = str(cfg.checkpointer.checkpoint_dir)
        lora = ["--enable-lora", "--lora-modules", f"{adapter_name(cfg.output_dir)}={adapter}"]
        commands.append(shlex.join(["vllm", "serve", base, *lora, "--max-lora-rank", str(rank), *common]))
    merged = checkpoint / checkpoints.MERGED
    if (merged / "model.safetensors").is_file():
        commands.append(shlex.join(["vllm", "serve", str(merged), *common]))
    else:
        notes.append(f"no merged model in {checkpoint}; write it with: python -m lora_tools.export --config ...")
    return commands, notes
