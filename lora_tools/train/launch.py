"""Entry point for recipes: read the config once, check it, run, and turn user mistakes into one line on stderr
with a non-zero exit instead of a traceback."""

import functools
import sys
from collections.abc import Callable

from torchtune import utils

from lora_tools.checkpoints import lock
from lora_tools.config import loader, preflight
from lora_tools.config.env import load_env
from lora_tools.errors import UserError, fail
from lora_tools.memory import plan


def recipe_main(main: Callable[[loader.Loaded], None]) -> Callable[[], int]:
    """Decorate a recipe's ``main(config)``: loads .env, reads and checks the config once (``loader.Loaded``: the
    DictConfig and its typed settings), runs the checks that need no weights, holds the output_dir lock (one run
    per output_dir) while ``main`` runs, and reports UserError as one line."""

    @functools.wraps(main)
    def wrapper() -> int:
        try:
            load_env()
            config = loader.load(sys.argv[1:], description=main.__doc__ or "")
            if config.settings.memory_budget:  # first: it needs neither the GPU nor the weights, and may change keys
                config = loader.with_overrides(config, plan.overrides_for_budget(config.settings))
            preflight.run_all(config.cfg)  # before any weights are read or anything is written
            # torchtune's modules set its shared logger to DEBUG when imported; until the recipe prints the config
            # (torchtune's log_config sets DEBUG again), INFO, so a mistake found while reading the data is the
            # only line printed.
            utils.get_logger("INFO")
            with lock.hold(config.cfg.output_dir):  # before anything is written; released on any exit
                main(config)
        except UserError as e:
            return fail(str(e))
        return 0

    return wrapper
