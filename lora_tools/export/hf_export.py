"""torchtune weights -> the folders Hugging Face loads: a PEFT adapter, and a merged model.

Only public torchtune API is used; what torchtune's checkpointer keeps to itself (the base model's config.json,
its folder, the Hub id recorded at download time) is read here from the checkpoint folder the config names.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune.models import convert_weights
from torchtune.modules.peft import get_lora_module_names, get_merged_lora_ckpt

from lora_tools.checkpoints import DISK_FULL, MERGED, AtomicFolder
from lora_tools.errors import UserError

# The base model's files that a merged model needs beside its weights (copied when present).
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # where newer transformers save the chat template
)
REPO_ID_FILE = "original_repo_id.json"  # written by lora_tools.download (and by `tune download`)


@dataclass(frozen=True)
class AdapterSpec:
    """The LoRA settings an exported adapter must carry (from the config's ``model`` section)."""

    rank: int
    alpha: float
    attn_modules: tuple[str, ...]
    mlp: bool
    output: bool
    dropout: float
    dora: bool

    @classmethod
    def from_model_config(cls, cfg_model: DictConfig) -> "AdapterSpec":
        return cls(
            rank=int(cfg_model.lora_rank),
            alpha=float(cfg_model.lora_alpha),
            attn_modules=tuple(cfg_model.lora_attn_modules),
            mlp=bool(cfg_model.get("apply_lora_to_mlp", False)),
            output=bool(cfg_model.get("apply_lora_to_output", False)),
            dropout=float(cfg_model.get("lora_dropout", 0.0)),
            dora=bool(cfg_model.get("use_dora", False)),
        )


def base_config(base_dir: Path) -> dict:
    """The base model's config.json."""
    return json.loads((Path(base_dir) / "config.json").read_text())


def base_model_name(base_dir: Path) -> str:
    """The Hub id recorded at download time, else the base model folder's absolute path."""
    repo_id_file = Path(base_dir) / REPO_ID_FILE
    if repo_id_file.is_file():
        return json.loads(repo_id_file.read_text())["repo_id"]
    return str(Path(base_dir).resolve())


def _heads(hf_config: dict) -> dict:
    """The attention shape torchtune's converters need to permute q/k rows into Hugging Face's RoPE order."""
    dim, num_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    return dict(
        num_heads=num_heads,
        num_kv_heads=hf_config["num_key_value_heads"],
        dim=dim,
        head_dim=hf_config.get("head_dim") or dim // num_heads,
    )


def peft_adapter_weights(adapter: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """torchtune adapter -> PEFT keys and layout.

    torchtune's converter permutes lora_B of q_proj/k_proj into Hugging Face's rotary row order but not the DoRA
    magnitude of those rows, so PEFT would scale the wrong rows; the magnitude gets the same permutation here.
    """
    heads = _heads(hf_config)
    out = convert_weights.tune_to_peft_adapter_weights(adapter, **heads)
    head_dim = heads["head_dim"]
    for key, value in out.items():
        for proj, n in (("q_proj", heads["num_heads"]), ("k_proj", heads["num_kv_heads"])):
            if key.endswith(f"{proj}.lora_magnitude_vector"):
                out[key] = value.view(n, head_dim // 2, 2).transpose(1, 2).reshape(-1)
    return out


def peft_adapter_config(spec: AdapterSpec, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA (or DoRA) adapter on a causal LM."""
    modules = get_lora_module_names(list(spec.attn_modules), spec.mlp, spec.output)
    config = convert_weights.tune_to_peft_adapter_config(
        {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": modules}, base_model_name_or_path=base_model
    )
    config.update(peft_type="LORA", task_type="CAUSAL_LM", use_dora=spec.dora, lora_dropout=spec.dropout, bias="none")
    return config


def write_adapter(folder: AtomicFolder, adapter: dict[str, torch.Tensor], spec: AdapterSpec, base_dir: Path) -> None:
    """adapter/ (PEFT format) into a checkpoint being written."""
    weights = peft_adapter_weights(adapter, base_config(base_dir))
    folder.write_safetensors("adapter/adapter_model.safetensors", weights)
    folder.write_json("adapter/adapter_config.json", peft_adapter_config(spec, base_model_name(base_dir)))


def merged_hf_weights(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], spec: AdapterSpec, hf_config: dict
) -> dict[str, torch.Tensor]:
    """Base weights (torchtune keys) with the adapter folded in, as Hugging Face keys and layout.

    Consumes ``base``: torchtune's merge adds into its tensors in place (no second copy of a 3B model in memory).
    """
    state = base
    state.update({k: v.to(base_dtype(base)) for k, v in adapter.items()})
    merged = get_merged_lora_ckpt(state, rank=spec.rank, alpha=spec.alpha)
    return convert_weights.tune_to_hf(merged, **_heads(hf_config))


# torchtune's QLoRA builders hold every linear weight of the transformer layers in NF4, the LoRA targets' bases and
# the other projections alike; the embedding (the tied output too) and the norms stay as loaded.
NF4_WEIGHT = re.compile(r"layers\.\d+\.(attn\.(q|k|v|output)_proj|mlp\.w[123])\.weight")


def as_trained(
    base: dict[str, torch.Tensor], model_cfg, merge_base: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The base weights (torchtune keys) that the adapter is merged into, changed in place.

    A QLoRA adapter was trained against the NF4-quantized base. With ``merge_base`` "dequantized", each weight
    torchtune holds in NF4 is quantized as training quantized it (torchao's ``to_nf4``, in the training dtype,
    with the model section's block sizes) and dequantized again, so that the merged model computes what training
    computed; "original" keeps the weights as loaded (docs/export.md compares the two). Other models: unchanged.
    """
    from lora_tools.train.model import is_qlora

    if merge_base != "dequantized" or not is_qlora(model_cfg):
        return base
    from torchao.dtypes.nf4tensor import to_nf4

    sizes = {k: model_cfg[k] for k in ("block_size", "scaler_block_size") if model_cfg.get(k) is not None}
    for key, weight in base.items():
        if NF4_WEIGHT.fullmatch(key):
            base[key] = to_nf4(weight.to(dtype), **sizes).get_original_weight().to(weight.dtype)
    return base


def base_dtype(base: dict[str, torch.Tensor]) -> torch.dtype:
    return next(v.dtype for v in base.values() if v.is_floating_point())


def write_merged_model(
    checkpoint: Path, base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], spec: AdapterSpec, base_dir: Path
) -> Path:
    """checkpoint/model/: the merged weights and the base model's side files, written atomically (a temporary
    folder renamed into place), so a kill never leaves a half-written model/."""
    folder = AtomicFolder(Path(checkpoint) / MERGED)
    try:
        folder.write_safetensors("model.safetensors", merged_hf_weights(base, adapter, spec, base_config(base_dir)))
        for name in HF_SIDE_FILES:
            source = Path(base_dir) / name
            if source.is_file():
                folder.copy(name, source)
        return folder.rename_into_place()
    except OSError as e:
        folder.discard()
        if e.errno not in DISK_FULL:
            raise
        raise UserError(
            f"the disk filled up while writing the merged model into {checkpoint} (the partial folder is removed; "
            "the adapter and resume state there are complete); free space, then write it with: python -m "
            f"lora_tools.export --config <your config> --checkpoint {checkpoint}"
        )
