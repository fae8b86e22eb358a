"""Fault injection for the atomic-save test: run the recipe as `tune run` does, but SIGKILL the process right
after the first file of the step-N checkpoint is written.

    python tests/crash_during_save.py N --config configs/tiny.yaml key=value ...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_finetune_single_device as recipe  # noqa: E402
from lora_tools import checkpoints  # noqa: E402


def main() -> int:
    step = int(sys.argv.pop(1))
    write = checkpoints.AtomicFolder.write

    def write_then_die(folder, relpath, writer):
        write(folder, relpath, writer)
        if folder.final.name == checkpoints.step_name(step):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.AtomicFolder.write = write_then_die
    return recipe.main()


if __name__ == "__main__":
    sys.exit(main())
