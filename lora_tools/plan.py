"""Whether a config fits a GPU, and the fastest memory settings that do, before any weights load.

    python -m lora_tools.plan --config lora_finetune_single_device.yaml [--gpu-memory 24GiB] [key=value ...]

Traces one training step of the configured model on fake tensors (no weights read, no GPU needed; see
lora_tools.memory) and prints its predicted peak memory by part. With a budget (--gpu-memory, or the free
memory of the visible GPU) it also traces the candidate settings, prints the fastest that fits as key=value
overrides, and says how far each other one is over. A recipe run with ``memory_budget`` does the same in
preflight and applies the choice.
"""

import sys
import time

from lora_tools.config import loader
from lora_tools.errors import UserError, fail
from lora_tools.memory.plan import budget_for, make, report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        gpu_memory = None
        for i, arg in enumerate(argv):
            if arg.startswith("--gpu-memory="):
                argv[i : i + 1] = ["--gpu-memory", arg.split("=", 1)[1]]
                break
        if "--gpu-memory" in argv:
            i = argv.index("--gpu-memory")
            if i + 1 >= len(argv):
                raise UserError("--gpu-memory needs a size, e.g. --gpu-memory 24GiB")
            gpu_memory = argv[i + 1]
            del argv[i : i + 2]
        config = loader.load(argv, description=__doc__)
        cfg = config.settings
        value = gpu_memory or cfg.memory_budget
        if value is None and cfg.device.startswith("cuda"):
            import torch

            value = "auto" if torch.cuda.is_available() else None
        budget = budget_for(value, cfg.device) if value else None
        t0 = time.perf_counter()
        plan = make(cfg, budget, compile_budgets=True)
        print(report(plan, config.source, cfg))
        print(f"(planned in {time.perf_counter() - t0:.1f} s)")
    except UserError as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
