"""Shape checks that run before any weights are read: the config's model builder against the base checkpoint,
and, when resuming or starting from another run's adapter (``start_adapter``), against that adapter.

The model is built on the ``meta`` device (shapes only, no memory, about a second even for 3B), so a mismatch
costs a second and one line instead of loading gigabytes and then printing dozens of "size mismatch" lines.
"""

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune.modules.peft import get_adapter_params

from lora_tools import checkpoints
from lora_tools.errors import UserError
from lora_tools.train.model import meta_model


def _model_shape(model: torch.nn.Module) -> dict[str, int]:
    first = model.layers[0]
    return {
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": model.tok_embeddings.embedding_dim,
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": first.attn.num_heads,
        "num_key_value_heads": first.attn.num_kv_heads,
        "intermediate_size": first.mlp.w1.weight.shape[0],
    }


def check_builder_matches_checkpoint(cfg_model: DictConfig, checkpoint_dir: Path) -> None:
    """The builder in ``model._component_`` must make the shapes of the base model's config.json."""
    config_json = Path(checkpoint_dir) / "config.json"
    if not config_json.is_file():
        raise UserError(f"{config_json} is missing: the base model folder needs the config.json of its weights")
    hf = json.loads(config_json.read_text())
    built = _model_shape(meta_model(cfg_model))
    wrong = [f"{key} {built[key]} (checkpoint: {hf[key]})" for key in built if key in hf and hf[key] != built[key]]
    if wrong:
        raise UserError(
            f"model._component_ {cfg_model._component_} does not match the checkpoint in {checkpoint_dir}: "
            f"{', '.join(wrong)}; use the builder made for that checkpoint (e.g. lora_llama3_2_3b for "
            "Llama-3.2-3B) or point checkpointer.checkpoint_dir at the weights of this one"
        )


def check_adapter_matches(
    cfg_model: DictConfig,
    adapter: dict[str, torch.Tensor],
    folder: Path,
    fix: str = "resume with the model settings it was trained with, or start a new output_dir",
) -> None:
    """This config's LoRA settings must make the adapter the checkpoint holds."""
    expected = {k: tuple(p.shape) for k, p in get_adapter_params(meta_model(cfg_model)).items()}
    saved = {k: tuple(v.shape) for k, v in adapter.items()}
    if expected == saved:
        return
    differing = sorted(k for k in expected.keys() & saved.keys() if expected[k] != saved[k])
    if differing:
        key = differing[0]
        detail = f"{key} is {saved[key]} in the checkpoint but {expected[key]} with this config"
    else:
        only_saved, only_new = sorted(saved.keys() - expected.keys()), sorted(expected.keys() - saved.keys())
        detail = f"the checkpoint has {only_saved[0]}" if only_saved else f"the checkpoint lacks {only_new[0]}"
    raise UserError(
        f"the model's LoRA settings (lora_rank, lora_attn_modules, apply_lora_to_mlp/output, use_dora) differ from "
        f"the checkpoint in {folder}: {detail}; {fix}"
    )


def starting_adapter(path: str, cfg_model: DictConfig) -> dict[str, torch.Tensor]:
    """``start_adapter``: the adapter of another run (an SFT run's, say) to train on from, in torchtune's keys.
    ``path`` is that run's output_dir (its newest checkpoint) or one of its checkpoints/step_N folders."""
    given = Path(path)
    folder = given if checkpoints.is_complete(given) else checkpoints.latest_checkpoint(given)
    if folder is None:
        raise UserError(
            f"start_adapter: {path} is neither a checkpoint folder (with {checkpoints.RECIPE_STATE}) nor an "
            "output_dir holding one; point it at a finished run's output_dir or its checkpoints/step_N"
        )
    adapter = checkpoints.load_recipe_state(folder)["adapter"]
    fix = "set lora_rank, lora_alpha and the targets as that run had them (its provenance.json holds its config)"
    check_adapter_matches(cfg_model, adapter, folder, fix)
    record = folder / checkpoints.PROVENANCE  # written with every checkpoint; absent if copied without it
    saved = json.loads(record.read_text()).get("config", {}).get("model", {}) if record.is_file() else {}
    if saved.get("lora_alpha", cfg_model.get("lora_alpha")) != cfg_model.get("lora_alpha"):  # shapes can't tell
        raise UserError(
            f"start_adapter: model.lora_alpha is {cfg_model.get('lora_alpha')} here but {saved.get('lora_alpha')} "
            f"in the run that trained {folder}; {fix}"
        )
    return adapter
