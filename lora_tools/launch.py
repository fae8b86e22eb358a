"""Entry point for recipes: read the YAML config and key=value overrides, check them, run, and turn user
mistakes into one line on stderr with a non-zero exit instead of a traceback.

It replaces ``torchtune.config.parse`` (same ``--config FILE key=value ...`` syntax, same merge rules) so
that a missing file, a malformed override or a missing key is reported the way the rest of the project
reports errors.
"""

import argparse
import functools
import os
import sys
from collections.abc import Callable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _merge_yaml_and_cli_args

from lora_tools import preflight
from lora_tools.env import load_env
from lora_tools.errors import UserError

EXIT_USER_ERROR = 2

# Keys every recipe config must define; the rest have documented defaults in the recipe.
REQUIRED_KEYS = (
    "output_dir",
    "model",
    "tokenizer",
    "checkpointer",
    "dataset",
    "batch_size",
    "epochs",
    "optimizer",
    "loss",
    "metric_logger",
    "device",
    "dtype",
)


def fail(message: str) -> int:
    """Print one error line and return the exit status for user errors.

    Under torchrun every process finds the same mistake; the first one on each machine prints it.
    """
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def _config_path(argv: list[str]) -> str:
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "<no --config given>"


def load_config(argv: list[str], description: str = "") -> DictConfig:
    """Parse ``--config FILE key=value ...`` exactly as torchtune does; raise UserError on bad input."""
    parser = TuneRecipeArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_file = _config_path(argv)
    try:
        yaml_args, cli_args = parser.parse_known_args(argv)
        cfg = _merge_yaml_and_cli_args(yaml_args, cli_args)
    except FileNotFoundError:
        raise UserError(f"config file not found: {config_file} (run from the repository root, or pass a valid path)")
    except IsADirectoryError:
        raise UserError(f"--config {config_file} is a folder; pass a YAML file")
    except (ValueError, OmegaConfBaseException, yaml.YAMLError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{config_file}: {first_line}")
    check_required_keys(cfg, config_file)
    return cfg


def check_required_keys(cfg: DictConfig, config_file: str) -> None:
    for key in REQUIRED_KEYS:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise UserError(
                f"{config_file}: required key '{key}' is missing; add it to the config "
                f"(see lora_finetune_single_device.yaml) or pass {key}=... on the command line"
            )


def recipe_main(main: Callable[[DictConfig], None]) -> Callable[[], int]:
    """Decorate a recipe's ``main(cfg)``: loads .env, parses and checks the config, reports UserError as one line."""

    @functools.wraps(main)
    def wrapper() -> int:
        load_env()
        try:
            cfg = load_config(sys.argv[1:], description=main.__doc__ or "")
            preflight.run_all(cfg)  # before any weights are read or anything is written
            main(cfg)
        except UserError as e:
            return fail(str(e))
        return 0

    return wrapper
