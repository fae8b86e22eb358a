"""Build the demo's tiny offline model, tokenizer and data (see lora_tools.demo.assets for what and why).

python -m lora_tools.tiny_assets [--out assets/tiny]
"""

import argparse
import sys
from pathlib import Path

from lora_tools.demo.assets import build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/tiny"), help="folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    summary = build(args.out)
    print(
        f"tiny assets: vocab {summary['vocab_size']}, {summary['train']} train + {summary['heldout']} held-out "
        f"samples, {summary['chat_train']} train + {summary['chat_heldout']} held-out chats -> {summary['out']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
