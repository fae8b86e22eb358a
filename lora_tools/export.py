"""Write the merged model (base weights with the adapter folded in, Hugging Face format) for a checkpoint.

    python -m lora_tools.export --config lora_finetune_single_device.yaml                # the newest checkpoint
    python -m lora_tools.export --config ... --checkpoint outputs/.../checkpoints/step_0000300

Training writes the merged model only into the last checkpoint of a run, so that a step checkpoint (or a
stop on Ctrl-C/SIGTERM) saves just the small adapter and the resume state. This command adds ``model/`` to
any checkpoint: it reads the base weights named by the config and the checkpoint's adapter, on the CPU.
"""

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf
from torchtune import config, training

from lora_tools import checkpoints, hf_export, preflight, settings
from lora_tools.errors import UserError, fail
from lora_tools.launch import load_config


def export(cfg, checkpoint: Path | None) -> Path:
    """Merge the checkpoint's adapter into the config's base weights; returns the model/ folder written."""
    preflight.check_model_files(cfg)
    checkpoint = checkpoint or checkpoints.latest_checkpoint(cfg.output_dir)
    if checkpoint is None:
        raise UserError(f"no checkpoint under {cfg.output_dir}/checkpoints; train first or pass --checkpoint")
    if not checkpoints.is_complete(checkpoint):
        raise UserError(f"{checkpoint} is not a complete checkpoint (no {checkpoints.RECIPE_STATE}); pass another")
    adapter = checkpoints.load_recipe_state(checkpoint)["adapter"]
    # torchtune's checkpointer wants an output_dir; it writes nothing there when only loading.
    ckpt_cfg = OmegaConf.merge(cfg.checkpointer, {"output_dir": str(checkpoint)})
    base = config.instantiate(ckpt_cfg).load_checkpoint()[training.MODEL_KEY]
    spec = hf_export.AdapterSpec.from_model_config(cfg.model)
    return hf_export.write_merged_model(checkpoint, base, adapter, spec, Path(cfg.checkpointer.checkpoint_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config the checkpoint was trained with")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step_N folder (default: the newest)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(["--config", args.config, *overrides])
        settings.parse(cfg, args.config)  # the same typo and value checks as training
        folder = export(cfg, args.checkpoint)
    except UserError as e:
        return fail(str(e))
    print(f"merged model (HF): {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
