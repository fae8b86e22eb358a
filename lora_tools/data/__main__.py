"""Look at the training data as the model will see it, before training.

    python -m lora_tools.data --config configs/tiny_chat.yaml              # 3 samples and the summary
    python -m lora_tools.data --config CFG --show 10 tokenizer.max_seq_len=1024

Prints the first samples as the token ids decode, the trained tokens marked, then for the whole dataset (and
val_dataset): samples, tokens per sample, how many are truncated at tokenizer.max_seq_len and how many tokens
that cuts, samples with nothing to train on, and how full packed rows are. Reads no model weights. The recipes
log the same summary when they start.
"""

import argparse
import sys

from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from lora_tools.config import loader, preflight
from lora_tools.data.batching import BuiltDataset, build_dataset
from lora_tools.errors import UserError, fail

TRAINED_START, TRAINED_END = "\x1b[32m", "\x1b[0m"  # green on a terminal
PLAIN_START, PLAIN_END = "«", "»"  # in a file or pipe


def marked_text(tokenizer, tokens: list[int], trained: list[bool], start: str, end: str) -> str:
    """The sample's text with each run of trained tokens between ``start`` and ``end``."""
    out, run, run_trained = [], [], None
    for token, is_trained in [*zip(tokens, trained, strict=True), (None, None)]:
        if is_trained != run_trained and run:
            text = tokenizer.decode(run, truncate_at_eos=False, skip_special_tokens=False)
            out.append(f"{start}{text}{end}" if run_trained else text)
            run = []
        run.append(token)
        run_trained = is_trained
    return "".join(out)


def show_samples(tokenizer, built: BuiltDataset, count: int, out=None) -> None:
    out = out or sys.stdout
    start, end = (TRAINED_START, TRAINED_END) if out.isatty() else (PLAIN_START, PLAIN_END)
    out.write(f"trained tokens are marked {start}like this{end}\n")
    for i in range(min(count, len(built.samples))):
        sample = built.samples[i]
        tokens = list(sample["tokens"])
        # labels are shifted: token j is trained when the label at j - 1 (its prediction) is kept
        trained = [False] + [label != CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"][:-1]]
        out.write(f"--- sample {i} ({len(tokens)} tokens, {sum(trained)} trained)\n")
        out.write(marked_text(tokenizer, tokens, trained, start, end) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--show", type=int, default=3, help="samples to print (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    if args.show < 0:
        return fail(f"--show {args.show}: give 0 or more samples to print")
    try:
        cfg = loader.load(["--config", args.config, *overrides]).cfg  # the same typo and value checks as training
        preflight.check_datasets(cfg)
        tokenizer = config.instantiate(cfg.tokenizer)
        sections = [("dataset", cfg.dataset)] + ([("val_dataset", cfg.val_dataset)] if cfg.get("val_dataset") else [])
        built = {name: build_dataset(node, tokenizer, CROSS_ENTROPY_IGNORE_IDX, name) for name, node in sections}
    except UserError as e:
        return fail(str(e))
    show_samples(tokenizer, built["dataset"], args.show)
    for name, b in built.items():
        print("\n".join(b.summary.lines(name)))
        if warning := b.summary.truncation_warning(name):
            print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
